"""Tiny nest captures made in the test's own process, through capture_main (the capture library
as the workflow runs it), optionally under mutants (tests/mutants.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from mutants import applied

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def capture_argv(
    out: Path, data: Path, steps: str, *keys: str, model_overrides: list[str] | None = None
) -> list[str]:
    """The capture command line of the tiny config (seed 42, one thread), for any framework;
    ``model_overrides`` in place of the tiny model's (another size). Later keys win."""
    return [
        "--config-path",
        str(ROOT / "config"),
        "--config-name",
        "nest_fast-conformer",
        f"model.train_ds.manifest_filepath={data}/train_manifest.json",
        f"model.train_ds.noise_manifest={data}/noise_manifest.json",
        f"model.validation_ds.manifest_filepath={data}/val_manifest.json",
        *(TINY["model_overrides"] if model_overrides is None else model_overrides),
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        f"output_dir={out}",
        "seed=42",
        f"save_steps={steps}",
        "threads=1",
        *keys,
    ]


def nest_capture(
    out: Path, data: Path, names: Iterable[str] = (), *keys: str, steps: str = "0"
) -> Path:
    """Capture ``steps`` of the nest port (under the mutants ``names``) into ``out``."""
    from nest_ssl.training import NestPretraining
    from nestalign.runner import capture_main

    with applied(list(names)):
        status = capture_main(
            capture_argv(out, data, steps, *keys),
            "nest",
            lambda cfg, tr: NestPretraining(cfg=cfg, trainer=tr),
            "t",
        )
    assert status == 0
    return out / f"step_{steps.split(',')[0]}"
