"""Pretrain NEST with the port: the command line of NeMo's masked_token_pred_pretrain.py.

    python -m nest_ssl.train --config-path config --config-name nest_fast-conformer \
        model.train_ds.manifest_filepath=train.json model.validation_ds.manifest_filepath=val.json \
        model.train_ds.noise_manifest=noise.json trainer.devices=1 trainer.accelerator=cpu

Overrides use Hydra syntax (``key=value``, ``+key=value``, ``~key``). It builds a Lightning Trainer
from ``trainer``, the model from ``model`` and fits. Unlike NeMo's script it seeds Python, numpy
and torch with ``seed`` when the config sets one (``seed=null`` leaves them alone), and it has no
experiment manager: the ``exp_manager`` section is ignored, so logging and checkpoints are what the
``trainer`` section asks Lightning for.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nest_ssl.config import ConfigError

#: Top-level keys besides model/trainer: accepted (the capture keys belong to the shared config).
TOP_LEVEL = {"name", "model", "trainer", "exp_manager", "seed"}
CAPTURE_KEYS = {
    "output_dir",
    "save_steps",
    "threads",
    "deterministic",
    "fault",
    "init_from",
    "force_from",
    "name_map",
    "resume_from",
    "state_from",
    "capture",
    "run_key",
}
PRECISIONS = (32, "32", "32-true")


def compose(config_path: str, config_name: str, overrides: list[str]) -> DictConfig:
    """The config as Hydra's command line composes it (no output folders, no chdir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    folder = Path(config_path).expanduser().resolve()
    if not (folder / f"{config_name}.yaml").is_file():
        raise SystemExit(f"config not found: {folder / (config_name + '.yaml')}")
    with initialize_config_dir(config_dir=str(folder), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer arguments; half precision is refused (not verified)."""
    unknown = sorted(set(cfg) - TOP_LEVEL - CAPTURE_KEYS)
    if unknown:
        raise ConfigError(f"top-level config keys not supported by nest_ssl: {unknown}")
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("precision", 32) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={kwargs['precision']!r} is not supported by nest_ssl (fp32 only)"
        )
    return kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nest_ssl.train",
        description="Pretrain NEST (masked token prediction with denoising) with the nest port.",
        epilog="Overrides are Hydra syntax, e.g. model.train_ds.batch_size=4 trainer.max_steps=10.",
    )
    parser.add_argument("--config-path", "-cp", default="config", help="config folder")
    parser.add_argument("--config-name", "-cn", default="nest_fast-conformer", help="config name")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    args = parser.parse_args(argv)
    cfg = compose(args.config_path, args.config_name, args.overrides)
    kwargs = trainer_kwargs(cfg)

    import lightning.pytorch as pl

    from nest_ssl.training import NestPretraining

    if cfg.get("seed") is not None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    trainer = pl.Trainer(**kwargs)
    model = NestPretraining(cfg.model, trainer)
    trainer.fit(model)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
