"""Unit tests of the port's data side: manifests, audio loading, dataset, collate, augmentation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_ssl.audio import AudioError, SampleRateError, load_audio
from nest_ssl.augmentation import MultiSpeakerNoiseAugmentation
from nest_ssl.batch import AudioNoiseBatch, AudioNoiseItem
from nest_ssl.dataset import (
    AudioNoiseDataset,
    collate_audio_noise,
    load_noise_audio,
    pad_audio,
    sample_noise,
)
from nest_ssl.manifest import ManifestError, read_audio_manifests, read_noise_manifests

SR = 16000


def wav(path, seconds, value=None, subtype="FLOAT", sr=SR, channels=1):
    n = int(seconds * sr)
    rng = np.random.default_rng(len(str(path)))
    x = rng.uniform(-0.5, 0.5, (n, channels)) if value is None else np.full((n, channels), value)
    sf.write(path, x.astype(np.float32).squeeze(), sr, subtype=subtype)
    return path


def manifest(path, entries, blank=False):
    lines = [json.dumps(e) for e in entries]
    if blank:
        lines.insert(1, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- manifests -------------------------------------------------------------------------------


def test_manifest_filters_strictly_keeps_order_and_resolves_paths(tmp_path):
    for name in "abcd":
        wav(tmp_path / f"{name}.wav", 0.1)
    m = manifest(
        tmp_path / "m.json",
        [
            {"audio_filepath": "c.wav", "duration": 2.0, "text": "hi"},
            {"audio_filepath": "a.wav", "duration": 1.0},  # == min: kept
            {"audio_filepath": "b.wav", "duration": 0.99},  # < min: dropped
            {"audio_filename": "d.wav", "duration": 3.0, "offset": 0.5},  # == max: kept
            {"audio_filepath": "a.wav", "duration": 3.01},  # > max: dropped
            {"audio_filepath": "b.wav"},  # no duration: kept
        ],
        blank=True,
    )
    entries = read_audio_manifests(str(m), min_duration=1.0, max_duration=3.0)
    assert [e.audio_file for e in entries] == [str(tmp_path / f"{n}.wav") for n in "cadb"]
    assert [e.id for e in entries] == [0, 1, 3, 5]
    assert entries[2].offset == 0.5 and entries[3].duration is None


def test_manifest_comma_string_and_list_read_in_turn(tmp_path):
    wav(tmp_path / "a.wav", 0.1)
    one = manifest(tmp_path / "one.json", [{"audio_filepath": "a.wav", "duration": 1}])
    two = manifest(tmp_path / "two.json", [{"audio_filepath": "a.wav", "duration": 2}] * 2)
    by_string = read_audio_manifests(f"{one},{two}")
    by_list = read_audio_manifests([str(one), str(two)])
    assert [e.duration for e in by_string] == [1, 2, 2] == [e.duration for e in by_list]
    assert [e.id for e in by_string] == [0, 1, 2]


def test_relative_path_missing_next_to_manifest_is_kept_as_given(tmp_path):
    m = manifest(tmp_path / "m.json", [{"audio_filepath": "nowhere/x.wav"}])
    assert read_audio_manifests(str(m))[0].audio_file == "nowhere/x.wav"


@pytest.mark.parametrize(
    "line,message",
    [('{"duration": 1.0}', "m.json:2: no 'audio_filepath'"), ("{oops", "m.json:2: not valid JSON")],
)
def test_bad_manifest_lines_name_file_and_line(tmp_path, line, message):
    m = tmp_path / "m.json"
    m.write_text('{"audio_filepath": "a.wav"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=message):
        read_audio_manifests(str(m))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_audio_manifests(str(tmp_path / "absent.json"))


def test_noise_manifest_is_not_filtered(tmp_path):
    wav(tmp_path / "n.wav", 0.1)
    m = manifest(
        tmp_path / "n.json", [{"audio_filepath": "n.wav", "duration": d} for d in (0.1, 99)]
    )
    noise = read_noise_manifests(str(m))
    assert [n["duration"] for n in noise] == [0.1, 99]
    assert noise[0]["audio_filepath"] == str(tmp_path / "n.wav")
    assert read_noise_manifests(None) == []


# --- audio -----------------------------------------------------------------------------------


def test_pcm16_is_scaled_and_segments_are_cut_in_frames(tmp_path):
    ramp = (np.arange(SR) - SR // 2).astype(np.int16)
    sf.write(tmp_path / "r.wav", ramp, SR, subtype="PCM_16")
    full = load_audio(str(tmp_path / "r.wav"), SR)
    assert full.dtype == np.float32 and np.array_equal(full, ramp.astype(np.float32) / 32768)
    part = load_audio(str(tmp_path / "r.wav"), SR, offset=0.1, duration=0.05)
    assert np.array_equal(part, full[1600 : 1600 + 800])
    assert np.array_equal(load_audio(str(tmp_path / "r.wav"), SR, offset=0.0, duration=0), full)


def test_float_wav_round_trips(tmp_path):
    path = wav(tmp_path / "f.wav", 0.2)
    assert np.array_equal(load_audio(str(path), SR), sf.read(path, dtype="float32")[0])


def test_wrong_sample_rate_and_stereo_are_errors_naming_the_file(tmp_path):
    path = wav(tmp_path / "8k.wav", 0.1, sr=8000)
    with pytest.raises(SampleRateError, match=r"8k\.wav: sample rate 8000 Hz.*does not resample"):
        load_audio(str(path), SR)
    stereo = wav(tmp_path / "st.wav", 0.1, channels=2)
    with pytest.raises(AudioError, match=r"st\.wav: 2 channels"):
        load_audio(str(stereo), SR)
    with pytest.raises(AudioError, match=r"missing\.wav: cannot open"):
        load_audio(str(tmp_path / "missing.wav"), SR)


# --- dataset ---------------------------------------------------------------------------------


def test_pad_audio_repeats_zero_pads_and_rejects_unknown_mode():
    x = torch.arange(1.0, 4.0)
    assert pad_audio(x, 7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert pad_audio(x, 5, "zero").tolist() == [1, 2, 3, 0, 0]
    assert pad_audio(torch.zeros(0), 2).tolist() == [0, 0]
    assert pad_audio(x, 2) is x
    with pytest.raises(ValueError, match="pad_audio_mode"):
        pad_audio(x, 7, "mirror")


def test_no_noise_manifest_gives_silence_without_numpy_draws():
    np.random.seed(3)
    noise, noise_len = sample_noise([], SR, 1234)
    assert noise.dtype == torch.float32 and not noise.any() and noise_len.item() == 1234
    np.random.seed(3)
    expected = np.random.rand()
    np.random.seed(3)
    sample_noise([], SR, 10)
    assert np.random.rand() == expected


def test_short_noise_clip_is_padded_and_keeps_its_length(tmp_path):
    entry = {"audio_filepath": str(wav(tmp_path / "n.wav", 0.5)), "duration": 0.5}
    noise, noise_len = load_noise_audio(entry, SR, 2 * SR)
    assert noise.shape == (2 * SR,) and noise_len.item() == SR // 2
    assert not noise[SR // 2 :].any() and noise[: SR // 2].any()


def test_long_noise_clip_is_cut_at_a_random_offset(tmp_path):
    entry = {"audio_filepath": str(wav(tmp_path / "n.wav", 3.0, value=0.25)), "duration": 3.0}
    np.random.seed(0)
    noise, noise_len = load_noise_audio(entry, SR, SR)
    assert noise_len.item() == SR and torch.all(noise == 0.25)
    np.random.seed(0)
    np.random.uniform(0, 2.0)  # the one offset draw
    after = np.random.rand()
    np.random.seed(0)
    load_noise_audio(entry, SR, SR)
    assert np.random.rand() == after


def test_silent_and_negative_clips_are_redrawn_then_filled_with_white_noise(tmp_path):
    entry = {"audio_filepath": str(wav(tmp_path / "z.wav", 2.0, value=0.0)), "duration": 2.0}
    np.random.seed(1)
    noise, noise_len = load_noise_audio(entry, SR, SR)
    assert noise_len.item() == SR and noise.abs().max() < 10 ** (-46 / 20) * 6
    np.random.seed(1)
    for _ in range(100):  # all tries fail, then the white-noise level and samples
        np.random.uniform(0, 1.0)
    level = np.random.randint(-90, -46, dtype="int32")
    white = np.random.randn(SR) * 10.0 ** (level / 20.0)
    assert torch.equal(noise, torch.tensor(np.zeros(SR, np.float32) + white, dtype=torch.float))


def test_unreadable_noise_clips_fall_back_to_silence_but_sample_rate_is_an_error(tmp_path):
    bad = [{"audio_filepath": str(tmp_path / "missing.wav"), "duration": 1.0}]
    noise, noise_len = sample_noise(bad, SR, 100)
    assert not noise.any() and noise_len.item() == 100
    wrong = [{"audio_filepath": str(wav(tmp_path / "8k.wav", 0.1, sr=8000)), "duration": 0.1}]
    with pytest.raises(SampleRateError):
        sample_noise(wrong, SR, 100)


def test_dataset_item_and_collate_without_augmentor(tmp_path):
    wav(tmp_path / "a.wav", 0.25)
    wav(tmp_path / "b.wav", 1.5)
    m = manifest(
        tmp_path / "m.json",
        [{"audio_filepath": "a.wav", "duration": 0.25}, {"audio_filepath": "b.wav"}],
    )
    ds = AudioNoiseDataset(str(m), SR)
    items = [ds[0], ds[1]]
    assert items[0].sample_id == "0" and items[0].audio_len.item() == SR  # repeated up to 1 s
    assert torch.equal(items[0].audio[:4000], items[0].audio[4000:8000])
    batch = ds.collate_fn(items)
    assert batch.sample_id is None and batch.audio.shape == (2, 24000)
    assert batch.audio_len.tolist() == [SR, 24000] and batch.audio_len.dtype == torch.int64
    assert not batch.audio[0, SR:].any()
    assert torch.equal(batch.noisy_audio, batch.audio + batch.noise)
    assert torch.equal(batch.noisy_audio_len, batch.audio_len)


# --- augmentation ----------------------------------------------------------------------------


def make_batch(lengths, total):
    audio = torch.zeros(len(lengths), total)
    noise = torch.zeros(len(lengths), total)
    for i, n in enumerate(lengths):
        audio[i, :n] = torch.linspace(0.1, 1.0, n) * (i + 1)
        noise[i, : n // 2] = 0.3
    return AudioNoiseBatch(
        audio=audio,
        audio_len=torch.tensor(lengths),
        noise=noise,
        noise_len=torch.tensor([n // 2 for n in lengths]),
    )


def test_skipped_items_keep_raw_noise_and_its_length():
    batch = make_batch([100, 80], 100)
    raw, raw_len = batch.noise.clone(), batch.noise_len.clone()
    out = MultiSpeakerNoiseAugmentation(prob=0.0)(batch)
    assert torch.equal(out.noise, raw) and torch.equal(out.noisy_audio_len, raw_len)
    assert torch.equal(out.noisy_audio, out.audio + raw)


def test_noise_mode_scales_to_the_drawn_energy_ratio_and_counts_draws():
    batch = make_batch([100], 100)
    aug = MultiSpeakerNoiseAugmentation(
        prob=1.0,
        noise_ratio=1.0,
        min_mix_rate=0.5,
        max_mix_rate=0.5,
        max_num_segments=1,
        max_num_speakers=1,
        min_r_noise=3.0,
        max_r_noise=3.0,
    )
    random.seed(5)
    out = aug(batch)
    e_audio = (out.audio[0] ** 2).mean()
    e_noise = (out.noise[0] ** 2).mean()
    assert abs(10 * torch.log10(e_audio / e_noise).item() - 3.0) < 1e-4
    assert out.noise_len.tolist() == [100] and out.noisy_audio_len.tolist() == [100]
    assert (out.noise[0] != 0).sum().item() == 50  # mix_len = int(100 * 0.5)
    # draws: apply, randint(1,1) twice, 50 choices, mode, ratio, placement
    random.seed(5)
    rng = random.Random()
    rng.setstate(random.getstate())
    rng.random(), rng.randint(1, 1), rng.randint(1, 1)
    [rng.random() for _ in range(50)]
    rng.random(), rng.uniform(3.0, 3.0), rng.randint(0, 49)
    random.seed(5)
    aug(make_batch([100], 100))
    assert random.getstate() == rng.getstate()


def test_speech_mode_mixes_another_utterance():
    batch = make_batch([100, 100], 100)
    aug = MultiSpeakerNoiseAugmentation(
        prob=1.0,
        noise_ratio=0.0,
        min_mix_rate=1.0,
        max_mix_rate=1.0,
        max_num_segments=1,
        max_num_speakers=1,
    )
    random.seed(0)
    out = aug(batch)
    for i in range(2):
        other = out.audio[1 - i]
        mix = out.noise[i]
        ratio = mix[mix != 0] / other[: int((mix != 0).sum())]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
        assert out.noisy_audio_len[i].item() == 100


def test_augmentor_rejects_bad_settings_and_unknown_targets():
    with pytest.raises(ValueError, match="prob must be in"):
        MultiSpeakerNoiseAugmentation(prob=1.5)
    with pytest.raises(ValueError, match="min_mix_rate"):
        MultiSpeakerNoiseAugmentation(min_mix_rate=0.8, max_mix_rate=0.2)
    with pytest.raises(ValueError, match="_target_"):
        MultiSpeakerNoiseAugmentation.from_config({"_target_": "x.SpeakerNoiseAugmentation"})


def test_collate_pads_noise_and_applies_augmentor():
    seen = []

    def augmentor(batch):
        seen.append(batch)
        return batch

    batch = collate_audio_noise(
        [
            AudioNoiseItem("0", torch.ones(3), torch.tensor(3), torch.ones(2), torch.tensor(2)),
            AudioNoiseItem("1", torch.ones(5), torch.tensor(5), torch.ones(5), torch.tensor(5)),
        ],
        augmentor,
    )
    assert seen == [batch] and batch.noisy_audio is None
    assert batch.noise.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.noise_len.tolist() == [2, 5]
