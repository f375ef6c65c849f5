"""Capture the nest port's NEST model (nest_ssl) at the requested training steps.

    python scripts/capture_nest.py --config-path config --config-name nest_fast-conformer \
        model.train_ds.manifest_filepath=... model.train_ds.noise_manifest=... \
        trainer.devices=1 trainer.accelerator=cpu output_dir=DIR seed=42 save_steps="0,2"

Runs in the nest env (no NeMo). Writes DIR/step_N/ for each saved step (see docs/artifacts.md).
"""

import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Imported before capture_main seeds the generators, as the NeMo capture imports NeMo.
from nest_ssl.training import NestPretraining  # noqa: E402
from nestalign.runner import capture_main  # noqa: E402


def build(model_cfg, trainer):
    return NestPretraining(cfg=model_cfg, trainer=trainer)


def version() -> str:
    try:
        return dist_version("nest-align")
    except PackageNotFoundError:
        return "source"


if __name__ == "__main__":
    raise SystemExit(capture_main(sys.argv[1:], "nest", build, version()))
