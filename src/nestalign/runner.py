"""Shared driver of the capture scripts: Hydra-style config, seeding, Trainer, CaptureCallback.

A capture script supplies only how its framework builds the model:

    def build(model_cfg, trainer): return SomeLightningModule(cfg=model_cfg, trainer=trainer)
    raise SystemExit(capture_main(sys.argv[1:], "myfw", build, version="1.0"))

Command line (the one the original NeMo capture tool used):

    python scripts/capture_X.py --config-path config --config-name nest_fast-conformer \
        model.train_ds.manifest_filepath=... trainer.devices=1 trainer.accelerator=cpu \
        output_dir=DIR seed=42 save_steps="0,2"
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nestalign import artifacts as art
from nestalign.manifests import check_manifests
from nestalign.namemap import NameMap, NameMapError
from nestalign.resume import ResumeError
from nestalign.state import InitError

OUTPUT_NAMES = ("log_probs", "encoded_len", "masks", "tokens")
CAPTURE_MODES = ("full", "fingerprint")


def parse_args(argv: list[str], framework: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"capture_{framework}.py",
        description=f"Train {framework}'s NEST model from a Hydra config and capture the steps "
        "listed in save_steps (0 = first optimizer step) into OUTPUT_DIR/step_N/.",
        epilog="Overrides are Hydra syntax (key=value, +key=value, ~key). Capture keys: "
        "output_dir (required), seed, save_steps ('0,2'), threads, deterministic, "
        "fault (MODULE_PATH*FACTOR[@STEP]: scale that module's output, at one optimizer step "
        "only with @STEP: a planted fault), "
        "init_from (a reference step dir: start from its initial weights and generators), "
        "force_from (a reference step dir: teacher-force that step), "
        "name_map (YAML: candidate -> reference names, for init_from and force_from), "
        "resume_from (a step dir of this run's own earlier capture: continue right after it), "
        "state_from (a reference step dir: continue from its complete training state, "
        "through name_map), "
        "capture (full: every tensor; fingerprint: only each tensor's hash and statistics), "
        "run_key (kept in metadata: the workflow resumes only runs of the same key).",
    )
    parser.add_argument("--config-path", "-cp", default="config", help="config directory")
    parser.add_argument("--config-name", "-cn", default="nest_fast-conformer")
    parser.add_argument(
        "--cfg",
        "-c",
        choices=["job"],
        help="print the composed config (as Hydra's --cfg job does) and exit",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. seed=42")
    return parser.parse_args(argv)


def load_config(config_path: str, config_name: str, overrides: list[str]) -> DictConfig:
    """Compose the config like Hydra's command line does, without Hydra's output directories."""
    from hydra import compose, initialize_config_dir

    path = Path(config_path)
    if not path.is_absolute():
        path = path.resolve()
    if not (path / f"{config_name}.yaml").is_file():
        raise SystemExit(f"config not found: {path / (config_name + '.yaml')}")
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(path), version_base=None):
            return compose(config_name=config_name, overrides=[_quote_steps(o) for o in overrides])
    except HydraException as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise SystemExit(f"config: {text}") from None


def _quote_steps(override: str) -> str:
    """Let `save_steps=0,2` (the shell already ate the quotes) mean a string, not a Hydra sweep."""
    key, sep, value = override.partition("=")
    if key == "save_steps" and sep and "," in value and value[:1] not in "'\"[":
        return f"{key}='{value}'"
    return override


def parse_steps(value: Any) -> list[int]:
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        steps = sorted({int(str(p).strip()) for p in parts if str(p).strip()})
    except ValueError:
        raise SystemExit(f"save_steps must be comma-separated integers, got {value!r}") from None
    if not steps or steps[0] < 0:
        raise SystemExit(f"save_steps must list steps >= 0, got {value!r}")
    return steps


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): NeMo's own script seeds nothing."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_numerics(threads: int, deterministic: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"threads": threads, "deterministic": deterministic}


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit systems


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system
    (blocks up to 32 MiB come from the heap, which is never trimmed). A captured step copies
    every tensor it records; on pages the process already holds, those copies run at memory
    speed instead of waiting on a page fault per 4 KiB. Numbers are unchanged; the process's
    resident memory stays at its peak. Returns whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
            (M_TRIM_THRESHOLD, 2**31 - 1),
            (M_TOP_PAD, 64 << 20),
        )
    )


def config_sha256(cfg: DictConfig) -> str:
    text = OmegaConf.to_yaml(cfg.model, resolve=True)
    return hashlib.sha256(text.encode()).hexdigest()


def plant_fault(model: torch.nn.Module, spec: str) -> str:
    """Multiply one module's output by a factor: `encoder.layers.1.feed_forward2*1.001`, and
    with `@STEP` only while the model trains optimizer step STEP (`...*1.001@1`).

    A known fault in a real capture shows whether the compare finds it, and names the place
    it must name. The factor is applied by a forward hook to the first tensor of the output.
    """
    body, at, when = spec.partition("@")
    path, sep, factor = body.rpartition("*")
    try:
        if not sep:
            raise ValueError("no factor")
        module = model.get_submodule(path)
        scale = float(factor)
        step = int(when) if at else None
    except (AttributeError, ValueError):
        raise SystemExit(
            f"fault={spec!r}: expected MODULE_PATH*FACTOR[@STEP] with a module of the model"
        ) from None

    def scaled(_module, _args, output):
        if step is not None and (not model.training or model.trainer.global_step != step):
            return None
        if isinstance(output, torch.Tensor):
            return output * scale
        first, *rest = output
        return type(output)([first * scale, *rest])

    module.register_forward_hook(scaled)
    return f"{path}*{scale!r}" + ("" if step is None else f"@{step}")


def _existing_dir(value: Any, key: str) -> str | None:
    if not value:
        return None
    if not Path(str(value)).is_dir():
        raise SystemExit(f"{key}={value}: not a capture step directory")
    return str(value)


def capture_mode(value: Any) -> str:
    """``capture=full`` (every tensor's bytes) or ``capture=fingerprint`` (only fingerprints)."""
    if value not in CAPTURE_MODES:
        raise ValueError(f"capture={value!r}: expected one of {', '.join(CAPTURE_MODES)}")
    return str(value)


def trainer_kwargs(cfg: DictConfig, deterministic: bool) -> dict[str, Any]:
    """The config's trainer arguments; the run's length stays the config's, so the schedulers
    see it (CaptureCallback ends training after the last captured step)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=deterministic,
    )
    return kwargs


def check_trainer(cfg: DictConfig) -> None:
    """Refuse what a capture cannot record faithfully, and a GPU that is not there."""
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise SystemExit(
            f"trainer.accumulate_grad_batches={accumulate}: a capture records one batch per "
            "optimizer step; set it to 1 (raise model.train_ds.batch_size instead)"
        )
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SystemExit(f"trainer.accelerator={accelerator}, but torch sees no GPU")


def capture_main(
    argv: list[str],
    framework: str,
    build_model: Callable[[DictConfig, Any], Any],
    version: str,
) -> int:
    args = parse_args(argv, framework)
    cfg = load_config(args.config_path, args.config_name, args.overrides)
    if args.cfg == "job":
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    if not cfg.get("output_dir"):
        raise SystemExit("output_dir=DIR is required")
    check_trainer(cfg)
    steps = parse_steps(cfg.get("save_steps", "0"))
    seed = int(cfg.get("seed", 42))
    deterministic = bool(cfg.get("deterministic", True))
    numerics = set_numerics(int(cfg.get("threads", 2)), deterministic)
    keep_freed_memory()
    check_manifests(cfg.model)

    import lightning.pytorch as pl

    from nestalign.callback import CaptureCallback

    metadata = {
        "framework": framework,
        "framework_version": version,
        "seed": seed,
        "device": str(cfg.trainer.get("accelerator", "cpu")),
        "config_sha256": config_sha256(cfg),
        "overrides": list(args.overrides),
        "run_key": cfg.get("run_key"),
        **numerics,
    }
    try:
        name_map = NameMap.load(cfg.name_map) if cfg.get("name_map") else None
        callback = CaptureCallback(
            cfg.output_dir,
            steps,
            metadata,
            OUTPUT_NAMES,
            init_from=_existing_dir(cfg.get("init_from"), "init_from"),
            force_from=_existing_dir(cfg.get("force_from"), "force_from"),
            name_map=name_map,
            resume_from=_existing_dir(cfg.get("resume_from"), "resume_from"),
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            state_from=_existing_dir(cfg.get("state_from"), "state_from"),
            fingerprint=capture_mode(cfg.get("capture", "full")) == "fingerprint",
        )
    except (NameMapError, art.ArtifactError, ResumeError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    seed_everything(seed)
    kwargs = trainer_kwargs(cfg, deterministic)
    trainer = pl.Trainer(**kwargs, callbacks=[callback])
    model = build_model(cfg.model, trainer)
    if cfg.get("fault"):
        callback.metadata["fault"] = plant_fault(model, str(cfg.fault))
    try:
        trainer.fit(model)
    except (InitError, ResumeError, art.ArtifactError) as exc:
        raise SystemExit(str(exc)) from None
    for path in callback.written:
        print(f"captured {path}", file=sys.stderr)
    return 0
