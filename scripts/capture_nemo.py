"""Capture NeMo's NEST model (EncDecDenoiseMaskedTokenPredModel) at the requested training steps.

    python scripts/capture_nemo.py --config-path config --config-name nest_fast-conformer \
        model.train_ds.manifest_filepath=... model.train_ds.noise_manifest=... \
        trainer.devices=1 trainer.accelerator=cpu output_dir=DIR seed=42 save_steps="0,2"

Runs in the nemo env. Writes DIR/step_N/ for each saved step (see docs/artifacts.md).
"""

import sys
from importlib.metadata import version as dist_version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Imported before capture_main seeds the generators: importing NeMo draws from python's random.
from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel  # noqa: E402

from nestalign.runner import capture_main  # noqa: E402


def build(model_cfg, trainer):
    return EncDecDenoiseMaskedTokenPredModel(cfg=model_cfg, trainer=trainer)


if __name__ == "__main__":
    raise SystemExit(capture_main(sys.argv[1:], "nemo", build, dist_version("nemo_toolkit")))
