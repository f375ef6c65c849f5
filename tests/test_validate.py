"""The validation before any capture (nestalign.validate, scripts/validate.py, rules/validate.smk).

Every problem is one line naming its key or file; these tests pin each message, so they also
document what a user sees in results/logs/validation/<framework>.log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import ROOT, env_python
from nestalign import validate as v
from nestalign.dummy_data import make_data
from test_triggers import library_closure, rule_inputs

CFG = {
    "seed": 7,
    "sample_rate": 16000,
    "train": {"count": 3, "min_duration": 1.0, "max_duration": 1.5},
    "val": {"count": 2, "min_duration": 1.0, "max_duration": 1.2},
    "noise": {"count": 2, "min_duration": 2.0, "max_duration": 2.5},
}
TINY = yaml.safe_load((ROOT / "config/config.yaml").read_text())["model_overrides"]


def model_cfg(manifests: dict[str, Path], **changes) -> dict:
    """The part of a NEST model config that check_data reads."""
    cfg = {
        "sample_rate": 16000,
        "preprocessor": {"sample_rate": 16000},
        "train_ds": {
            "manifest_filepath": str(manifests["train"]),
            "noise_manifest": str(manifests["noise"]),
            "sample_rate": 16000,
            "batch_size": 2,
            "drop_last": True,
            "min_duration": 1.0,
            "max_duration": 60.0,
        },
        "validation_ds": {"manifest_filepath": str(manifests["val"]), "sample_rate": 16000},
    }
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    return cfg


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return make_data(CFG, tmp_path)


def test_the_dummy_data_passes(data):
    found = v.check_data(model_cfg(data))
    assert found.problems == []
    assert found.checked["manifests"] == {str(data[s]): CFG[s]["count"] for s in data}


def test_an_empty_manifest_is_named(data):
    data["val"].write_text("")
    assert v.check_data(model_cfg(data)).problems == [f"{data['val']}: no entries (empty manifest)"]


def test_a_missing_manifest_is_named(data, tmp_path):
    data["noise"] = tmp_path / "nope.json"
    assert v.check_data(model_cfg(data)).problems == [f"{data['noise']}: manifest not found"]


def test_a_wav_cut_to_half_its_bytes_is_caught_by_its_length(data, tmp_path):
    wav = tmp_path / "train" / "train_0001.wav"
    wav.write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])
    duration = json.loads(data["train"].read_text().splitlines()[1])["duration"]
    frames = sf.info(str(wav)).frames
    assert v.check_data(model_cfg(data)).problems == [
        f"{wav}: {frames} samples ({frames / 16000:.4f} s), but {data['train']}:2 says "
        f"duration {duration} s"
    ]


def test_a_duration_within_one_millisecond_passes(data):
    lines = [json.loads(line) for line in data["train"].read_text().splitlines()]
    lines[0]["duration"] += 0.0009
    data["train"].write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert v.check_data(model_cfg(data)).problems == []


def test_another_sample_rate_is_one_line_for_all_files(data):
    """Data made at 8 kHz for a 16 kHz model (data.sample_rate: 8000): one line, every file."""
    found = v.check_data(model_cfg(data, sample_rate=8000, **{"preprocessor.sample_rate": 8000}))
    assert found.problems == [
        "model.train_ds.sample_rate=16000 differs from model.sample_rate=8000",
        "model.validation_ds.sample_rate=16000 differs from model.sample_rate=8000",
        f"{data['train'].parent / 'train/train_0000.wav'}: 16000 Hz, the model's sample rate is "
        "8000 Hz (model.sample_rate) (and 6 more files like it)",
    ]


def test_a_stereo_file_is_named(data, tmp_path):
    wav = tmp_path / "val" / "val_0001.wav"
    mono, rate = sf.read(str(wav))
    sf.write(str(wav), np.stack([mono, mono], axis=1), rate)
    assert v.check_data(model_cfg(data)).problems == [
        f"{wav}: 2 channels, the model reads mono audio"
    ]


def test_a_missing_wav_is_named_with_its_manifest_line(data, tmp_path):
    wav = tmp_path / "noise" / "noise_0000.wav"
    wav.unlink()
    assert v.check_data(model_cfg(data)).problems == [
        f"{wav}: audio file not found ({data['noise']}:1)"
    ]


def test_too_few_training_clips_for_one_batch(data):
    found = v.check_data(model_cfg(data, **{"train_ds.batch_size": 4}))
    assert found.problems == [
        "model.train_ds.batch_size=4: only 3 training clips lie between min_duration 1.0 and "
        "max_duration 60.0 s, so with drop_last no batch is ever formed"
    ]


def test_keys_the_capture_sets_are_refused_naming_where():
    origins = {
        "model_overrides": ["model.encoder.d_model=64", "seed=1"],
        "frameworks.nest.overrides": ["+save_steps=3", "++output_dir=/tmp/x"],
    }
    assert v.reserved_overrides(origins) == [
        "model_overrides: 'seed=1' sets seed, which the capture sets itself from the sweep's "
        "`seeds`: remove it",
        "frameworks.nest.overrides: '+save_steps=3' sets save_steps, which the capture sets "
        "itself from the sweep's `steps`: remove it",
        "frameworks.nest.overrides: '++output_dir=/tmp/x' sets output_dir, which the capture "
        "sets itself from the capture job (results/capture/<framework>/seed_<seed>): remove it",
    ]


def test_the_disk_check_gives_the_need_and_the_free_bytes(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)._replace(free=5 * 10**9)
    monkeypatch.setattr(v.shutil, "disk_usage", lambda path: usage)
    params = 10**8  # 2.47 GB per capture
    assert v.check_disk(params, 6, tmp_path / "results").problems == [
        f"{tmp_path / 'results'}: the captures need about 29.66 GB (6 seed x step captures x "
        "2 sides x 2.47 GB for 100,000,000 parameters), only 5.00 GB (5000000000 bytes) free"
    ]
    assert v.check_disk(1_000_000, 6, tmp_path).problems == []


def test_a_wrong_hydra_key_is_hydras_message_in_one_line():
    cfg, problems = v.compose(str(ROOT / "config"), "nest_fast-conformer", ["model.encoder.nope=1"])
    assert cfg is None
    assert problems == [
        "config: Could not override 'model.encoder.nope'. "
        "To append to your config use +model.encoder.nope=1"
    ]


def tiny_overrides(data: dict[str, Path]) -> list[str]:
    return [
        f"model.train_ds.manifest_filepath={data['train']}",
        f"model.train_ds.noise_manifest={data['noise']}",
        f"model.validation_ds.manifest_filepath={data['val']}",
        *TINY,
    ]


def test_the_port_builds_the_tiny_model_and_refuses_an_optimizer(data):
    """nest's model code, in this (NeMo-free) env: the capture script's own build function."""
    script = ROOT / "scripts/capture_nest.py"
    config = str(ROOT / "config")
    cfg, _ = v.compose(config, "nest_fast-conformer", tiny_overrides(data))
    params, problems = v.check_model(script, cfg, "nest")
    assert problems == [] and params > 100_000
    cfg.model.optim.name = "adam"
    assert v.check_model(script, cfg, "nest") == (
        None,
        [
            "nest refuses the config: model.optim.name='adam' is not supported by nest_ssl "
            "(supported: ['adamw'])"
        ],
    )


def test_the_validation_rules_inputs_are_what_it_imports(tmp_path):
    for name in ("Snakefile", "rules", "scripts", "config", "envs", "src"):
        src = ROOT / name
        copy = shutil.copytree if src.is_dir() else shutil.copy2
        copy(src, tmp_path / name)
    targets = ["results/validation/nemo.json", "results/validation/nest.json"]
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "-n", "--forceall"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    inputs = rule_inputs(proc.stdout)
    imported = library_closure(
        "scripts/validate.py", "scripts/capture_nemo.py", "scripts/capture_nest.py"
    )
    for rule in ("validate_nemo", "validate_nest"):
        assert {f for f in inputs[rule] if f.startswith("src/nestalign/")} == imported, rule


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "model.encoder.nope=1",
            "config: Could not override 'model.encoder.nope'. "
            "To append to your config use +model.encoder.nope=1",
        ),
        (
            "model.optim.name=adam",
            "nest refuses the config: model.optim.name='adam' is not supported by nest_ssl "
            "(supported: ['adamw'])",
        ),
    ],
    ids=["wrong hydra key", "refused by the port"],
)
def test_the_script_in_the_nest_env_fails_with_one_line(data, tmp_path, override, line):
    out = tmp_path / "validation" / "nest.json"
    origins = {"frameworks.nest.overrides": [override, "seed=3"]}
    proc = subprocess.run(
        [
            str(env_python("nest")),
            str(ROOT / "scripts/validate.py"),
            "--framework=nest",
            f"--capture-script={ROOT / 'scripts/capture_nest.py'}",
            f"--config-path={ROOT / 'config'}",
            f"--origins={json.dumps(origins)}",
            f"--results={tmp_path}",
            f"--out={out}",
            *tiny_overrides(data),
            override,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-2:] == [
        "frameworks.nest.overrides: 'seed=3' sets seed, which the capture sets itself from the "
        "sweep's `seeds`: remove it",
        line,
    ]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
