"""Dummy data: deterministic bytes, NeMo manifest keys, special cases only when asked."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from nestalign.dummy_data import make_data

CFG = {
    "seed": 7,
    "sample_rate": 16000,
    "train": {"count": 3, "min_duration": 1.0, "max_duration": 2.0},
    "val": {"count": 2, "min_duration": 1.0, "max_duration": 1.5},
    "noise": {"count": 2, "min_duration": 2.0, "max_duration": 3.0},
}


def read_manifest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tree_bytes(root):
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_config_same_bytes(tmp_path):
    make_data(CFG, tmp_path / "a")
    make_data(CFG, tmp_path / "b")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    make_data({**CFG, "seed": 8}, tmp_path / "c")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")


def test_manifests_have_nemo_keys_and_true_durations(tmp_path):
    manifests = make_data(CFG, tmp_path)
    assert set(manifests) == {"train", "val", "noise"}
    train = read_manifest(manifests["train"])
    assert len(train) == 3
    for entry in train:
        assert set(entry) == {"audio_filepath", "duration", "text", "offset"}
        audio, sr = sf.read(tmp_path / entry["audio_filepath"], dtype="float32")
        assert sr == 16000 and audio.ndim == 1
        assert entry["duration"] == len(audio) / sr
        assert 1.0 <= entry["duration"] <= 2.0
        assert sf.info(str(tmp_path / entry["audio_filepath"])).subtype == "PCM_16"


def test_special_cases_only_when_asked(tmp_path):
    plain = make_data(CFG, tmp_path / "plain")
    assert min(e["duration"] for e in read_manifest(plain["train"])) >= 1.0
    assert min(e["duration"] for e in read_manifest(plain["noise"])) >= 2.0
    special = make_data(
        {**CFG, "short_train_clips": 2, "short_noise_clips": 1}, tmp_path / "special"
    )
    train = read_manifest(special["train"])
    assert len(train) == 5 and sum(e["duration"] < 1.0 for e in train) == 2
    noise = read_manifest(special["noise"])
    assert len(noise) == 3 and min(e["duration"] for e in noise) < 1.0


def test_float_format_and_stale_clips_removed(tmp_path):
    make_data({**CFG, "train": {**CFG["train"], "count": 5}}, tmp_path)
    manifests = make_data({**CFG, "format": "float"}, tmp_path)
    assert len(list((tmp_path / "train").iterdir())) == 3
    first = read_manifest(manifests["train"])[0]["audio_filepath"]
    assert sf.info(str(tmp_path / first)).subtype == "FLOAT"


def test_every_clip_is_finite_and_audible(tmp_path):
    small = {"count": 1, "min_duration": 0.2, "max_duration": 0.3}
    cfg = {**CFG, "train": small, "val": small, "format": "float"}
    cfg["noise"] = {**small, "count": 4}
    for seed in range(40):
        manifests = make_data({**cfg, "seed": seed}, tmp_path / str(seed))
        for manifest in manifests.values():
            for entry in read_manifest(manifest):
                audio, _ = sf.read(manifest.parent / entry["audio_filepath"], dtype="float32")
                assert np.isfinite(audio).all() and np.abs(audio).max() > 0.1, (seed, entry)
