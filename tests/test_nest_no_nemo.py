"""The port needs no NeMo: in the nest env `import nemo` fails, and nest still trains."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from conftest import run_python

TRAIN_ONE_STEP = r"""
import sys
import lightning.pytorch as pl
import torch
import yaml
from omegaconf import OmegaConf
try:
    import nemo  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("nemo is importable in the nest env")
from nest_ssl.training import NestPretraining

data = sys.argv[1]
cfg = OmegaConf.load("config/nest_fast-conformer.yaml")
for item in [
    "model.encoder.n_layers=2", "model.encoder.d_model=64", "model.encoder.n_heads=4",
    "model.encoder.subsampling_conv_channels=64", "model.train_ds.batch_size=2",
    "model.train_ds.num_workers=0", "model.validation_ds.num_workers=0",
    "model.masking.mask_prob=0.05",
    f"model.train_ds.manifest_filepath={data}/train.json",
    f"model.validation_ds.manifest_filepath={data}/train.json",
    f"model.train_ds.noise_manifest={data}/noise.json",
]:
    key, value = item.split("=", 1)
    OmegaConf.update(cfg, key, yaml.safe_load(value))
torch.manual_seed(0)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
model = NestPretraining(cfg.model, trainer)
before = {k: v.clone() for k, v in model.state_dict().items()}
trainer.fit(model)
after = model.state_dict()
changed = [k for k in before if not torch.equal(before[k], after[k])]
assert "nemo" not in sys.modules and not any(m.startswith("nemo.") for m in sys.modules)
assert torch.isfinite(trainer.callback_metrics["train_loss"])
assert "encoder.layers.0.self_attn.linear_q.weight" in changed, changed[:5]
assert "decoder.decoder_layers.0.weight" in changed
assert "quantizer.codebooks" not in changed and "mask_processor.mask_embedding" not in changed
print("OK", len(changed), float(trainer.callback_metrics["train_loss"]))
"""


def test_nest_env_has_no_nemo_and_trains_a_step(tmp_path, root):
    rng = np.random.default_rng(0)
    entries = []
    for i, seconds in enumerate([1.2, 1.7, 2.2]):
        sf.write(tmp_path / f"a{i}.wav", 0.1 * rng.standard_normal(int(seconds * 16000)), 16000)
        entries.append({"audio_filepath": f"a{i}.wav", "duration": seconds})
    (tmp_path / "train.json").write_text("\n".join(json.dumps(e) for e in entries))
    sf.write(tmp_path / "n.wav", 0.05 * rng.standard_normal(8000), 16000)
    (tmp_path / "noise.json").write_text(json.dumps({"audio_filepath": "n.wav", "duration": 0.5}))
    proc = run_python("nest", ["-c", TRAIN_ONE_STEP, str(tmp_path)], cwd=root)
    assert proc.stdout.startswith("OK")


def test_train_command_line(tmp_path, root):
    help_text = run_python("nest", ["-m", "nest_ssl.train", "--help"], cwd=root).stdout
    assert "--config-path" in help_text and "Hydra" in help_text
    sf.write(tmp_path / "a.wav", np.linspace(-0.5, 0.5, 24000), 16000)
    (tmp_path / "m.json").write_text(json.dumps({"audio_filepath": "a.wav", "duration": 1.5}))
    tiny = [
        "model.encoder.n_layers=1",
        "model.encoder.d_model=32",
        "model.encoder.n_heads=2",
        "model.encoder.subsampling_conv_channels=16",
        "model.train_ds.batch_size=1",
        "model.train_ds.num_workers=0",
        "model.validation_ds.num_workers=0",
        f"model.train_ds.manifest_filepath={tmp_path / 'm.json'}",
        f"model.validation_ds.manifest_filepath={tmp_path / 'm.json'}",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        "trainer.strategy=auto",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    proc = run_python("nest", ["-m", "nest_ssl.train", *tiny], cwd=root)
    assert "max_steps=1` reached" in proc.stderr + proc.stdout
