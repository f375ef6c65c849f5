"""NeMo's AudioNoiseDataset + collate vs the port's: same seeds, every batch field bitwise equal.

The data mixes 16-bit and float wavs, audio under 1 s (padded by repetition) and a noise manifest
with a clip longer than the audio (random offsets), a clip under 1 s, one shorter than most audio
(noise_len stays short for skipped items) and a silent clip (white noise, redrawn offsets).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_python

SR = 16000

# Runs in either env: builds the loader of the framework named in argv and saves every batch.
LOADER = r"""
import random, sys
import numpy as np, torch
from omegaconf import OmegaConf
fw, train, noise, out, seed, aug = sys.argv[1:7]
torch.set_num_threads(1)
augmentor = dict(
    prob=0.5, noise_ratio=0.5, min_r_speech=-5.0, max_r_speech=5.0, min_r_noise=-5.0,
    max_r_noise=20.0, min_mix_rate=0.5, max_mix_rate=0.5, min_num_segments=1,
    max_num_segments=1, min_num_speakers=1, max_num_speakers=1,
)
if aug == "wide":
    augmentor.update(prob=0.8, min_mix_rate=0.2, max_mix_rate=0.7, max_num_segments=3,
                     max_num_speakers=2)
ds = dict(manifest_filepath=train, noise_manifest=noise, sample_rate=16000, batch_size=3,
          shuffle=True, num_workers=0, pin_memory=False, drop_last=False, max_duration=60.0,
          min_duration=0.5, batch_augmentor=dict(
              _target_="nemo.collections.asr.modules.ssl_modules.MultiSpeakerNoiseAugmentation",
              **augmentor))
if fw == "nemo":
    from nemo.collections.asr.data.ssl_dataset import get_audio_noise_dataset_from_config
    # importing NeMo draws from Python's random: seed after the import
    random.seed(int(seed)); np.random.seed(int(seed)); torch.manual_seed(int(seed))
    dataset = get_audio_noise_dataset_from_config(OmegaConf.create(ds), global_rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=dataset.collate_fn,
                                         shuffle=True, num_workers=0, drop_last=False)
else:
    from nest_ssl.training import build_dataloader
    random.seed(int(seed)); np.random.seed(int(seed)); torch.manual_seed(int(seed))
    loader = build_dataloader(ds, 16000)
fields = ("sample_id", "audio", "audio_len", "noise", "noise_len", "noisy_audio",
          "noisy_audio_len")
batches = []
for epoch in range(3):
    for batch in loader:
        batches.append({f: getattr(batch, f) for f in fields})
batches.append({"torch": torch.rand(4), "numpy": torch.from_numpy(np.random.rand(4)),
                "python": torch.tensor([random.random() for _ in range(4)], dtype=torch.float64)})
torch.save(batches, out)
"""


def write_data(root):
    rng = np.random.default_rng(7)
    lines, noise = [], []
    for i, dur in enumerate([1.3, 2.1, 0.7, 2.9, 1.0, 1.6, 2.4, 0.6, 0.3, 70.0]):
        n = int(dur * SR) if dur < 60 else SR
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sf.write(root / f"a{i}.wav", x, SR, subtype="PCM_16" if i % 2 else "FLOAT")
        lines.append({"audio_filepath": f"a{i}.wav", "duration": dur, "text": "x"})
    # a0 listed with an offset and a shorter duration: read as a segment
    lines.append({"audio_filepath": "a3.wav", "duration": 1.2, "offset": 0.55})
    (root / "train.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    for i, dur in enumerate([4.0, 0.6, 1.2]):
        x = (0.05 * rng.standard_normal(int(dur * SR)) + 0.01).astype(np.float32)
        sf.write(root / f"n{i}.wav", x, SR, subtype="PCM_16")
        noise.append({"audio_filepath": f"n{i}.wav", "duration": dur})
    sf.write(root / "silent.wav", np.zeros(int(3.5 * SR), np.float32), SR, subtype="PCM_16")
    noise.append({"audio_filepath": "silent.wav", "duration": 3.5})
    (root / "noise.json").write_text("\n".join(json.dumps(x) for x in noise) + "\n")


def load_batches(path):
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed,aug", [(0, "nest"), (1, "nest"), (5, "wide"), (9, "wide")])
def test_dataset_and_collate_match_nemo(tmp_path, seed, aug):
    write_data(tmp_path)
    outs = {}
    for fw in ("nemo", "nest"):
        outs[fw] = tmp_path / f"{fw}.pt"
        args = ["-c", LOADER, fw, str(tmp_path / "train.json"), str(tmp_path / "noise.json")]
        run_python(fw, [*args, str(outs[fw]), str(seed), aug])
    ref, port = load_batches(outs["nemo"]), load_batches(outs["nest"])
    assert len(ref) == len(port) > 4
    for i, (a, b) in enumerate(zip(ref, port, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            if a[key] is None:
                assert b[key] is None, (i, key)
                continue
            assert a[key].dtype == b[key].dtype, (i, key)
            assert torch.equal(a[key], b[key]), f"batch {i} field {key} differs"
    # the data exercise what they are meant to: short noise kept short, silent clip filled
    lens = [(b["audio_len"], b["noisy_audio_len"]) for b in ref[:-1]]
    assert any(bool((n < a).any()) for a, n in lens), "no batch kept a short noise_len"
