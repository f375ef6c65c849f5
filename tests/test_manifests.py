"""Manifest checks before a capture: every problem names the manifest line and the file."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from nestalign.dummy_data import make_data
from nestalign.manifests import ManifestError, check_manifests

CFG = {
    "seed": 1,
    "sample_rate": 16000,
    "train": {"count": 2, "min_duration": 1.0, "max_duration": 1.2},
    "val": {"count": 1, "min_duration": 1.0, "max_duration": 1.2},
    "noise": {"count": 1, "min_duration": 1.0, "max_duration": 1.2},
}


def model_cfg(manifests):
    return OmegaConf.create(
        {
            "train_ds": {
                "manifest_filepath": str(manifests["train"]),
                "noise_manifest": str(manifests["noise"]),
            },
            "validation_ds": {"manifest_filepath": str(manifests["val"])},
        }
    )


def test_good_data_passes(tmp_path):
    check_manifests(model_cfg(make_data(CFG, tmp_path)))


def test_missing_wav_is_named(tmp_path):
    manifests = make_data(CFG, tmp_path)
    (tmp_path / "train" / "train_0001.wav").unlink()
    with pytest.raises(
        ManifestError, match=r"train_manifest.json:2: audio file not found: .*train_0001.wav"
    ):
        check_manifests(model_cfg(manifests))


def test_corrupt_wav_is_named(tmp_path):
    manifests = make_data(CFG, tmp_path)
    (tmp_path / "noise" / "noise_0000.wav").write_bytes(b"RIFF....WAVEjunk" * 4)
    with pytest.raises(
        ManifestError, match=r"noise_manifest.json:1: cannot read audio file .*noise_0000.wav"
    ):
        check_manifests(model_cfg(manifests))


def test_bad_json_and_missing_key_are_named(tmp_path):
    manifests = make_data(CFG, tmp_path)
    manifests["val"].write_text("{not json\n")
    with pytest.raises(ManifestError, match=r"val_manifest.json:1: not a JSON object"):
        check_manifests(model_cfg(manifests))
    manifests["val"].write_text(json.dumps({"duration": 1.0}) + "\n")
    with pytest.raises(ManifestError, match=r"val_manifest.json:1: no audio_filepath key"):
        check_manifests(model_cfg(manifests))


def test_missing_manifest_is_named(tmp_path):
    manifests = make_data(CFG, tmp_path)
    manifests["train"] = tmp_path / "nope.json"
    with pytest.raises(ManifestError, match=r"nope.json: manifest not found"):
        check_manifests(model_cfg(manifests))


@pytest.mark.slow
def test_capture_script_fails_naming_the_missing_wav(tmp_path):
    """Through a real capture script: an error naming the file, and no step directory."""
    import os
    import subprocess

    from conftest import ROOT, env_python

    manifests = make_data(CFG, tmp_path / "data")
    (tmp_path / "data" / "train" / "train_0000.wav").unlink()
    proc = subprocess.run(
        [
            str(env_python("nest")),
            str(ROOT / "scripts/capture_nest.py"),
            "--config-path",
            str(ROOT / "config"),
            f"model.train_ds.manifest_filepath={manifests['train']}",
            f"model.validation_ds.manifest_filepath={manifests['val']}",
            f"output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=600,
    )
    assert proc.returncode != 0
    assert "train_manifest.json:1: audio file not found" in proc.stderr
    assert "train_0000.wav" in proc.stderr
    assert not (tmp_path / "out").exists()
