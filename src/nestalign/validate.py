"""Checks run once per framework before any capture: each problem one line naming its key or file.

A capture that fails after minutes of training (or, worse, one that trains on the wrong audio)
costs far more than these checks. `scripts/validate.py` runs them in the framework's own env:

- reserved keys: `seed`, `output_dir` and `save_steps` are set by the capture job itself, so an
  override of them in `model_overrides` or a framework's `overrides` is refused;
- the config: composed as the capture composes it (config dir, name, the capture's overrides),
  then the framework's model, Trainer and optimizer are built on the CPU, without training, so a
  wrong Hydra key or a key the framework refuses fails here with Hydra's or the model's message;
- the data: every manifest has entries, every audio file is readable, mono, at the model's sample
  rate, and as long as the manifest's duration says; enough training clips for one batch;
- the disk: the captures of the sweep fit into the free space of the results folder.

Problems of one kind over many files are one line: the first file, and how many more.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

from nestalign.manifests import audio_path, manifest_paths

#: Config keys every capture job sets on its command line (from the sweep and the output folder).
RESERVED_KEYS = {
    "seed": "the sweep's `seeds`",
    "output_dir": "the capture job (results/capture/<framework>/seed_<seed>)",
    "save_steps": "the sweep's `steps`",
}

#: Bytes one capture step directory takes per model parameter, and a fixed part. Measured with
#: scripts/capture_nest.py on config/config.yaml's dummy data (batch 2, clips up to 3 s): the tiny
#: model (948,210 parameters) wrote 76.6 MB at step 0 and 89.5 MB at step 2; d_model 176 with
#: 4 layers (4,739,364 parameters) 164.1 MB at step 0. A line through the larger step-2 figure
#: and the 176 one, rounded up: weights, gradients and initial weights are 12.5 B per parameter,
#: the rest is layer outputs, which also grow with the batch size and the clip length.
BYTES_PER_PARAM = 24
FIXED_BYTES = 72_000_000
SIDES = 2


@dataclass
class Findings:
    """Problem lines, and what was checked (written to the validation JSON when nothing failed)."""

    problems: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)


def override_key(item: str) -> str:
    """The config key of a Hydra override: `++seed=1` -> `seed`, `~model.x` -> `model.x`."""
    return item.lstrip("+~").partition("=")[0].strip()


def reserved_overrides(origins: Mapping[str, Iterable[str]]) -> list[str]:
    """One line per override of a key the capture sets itself; origins: config key -> items."""
    lines = []
    for origin, items in origins.items():
        for item in items:
            key = override_key(item)
            if key in RESERVED_KEYS:
                lines.append(
                    f"{origin}: {item!r} sets {key}, which the capture sets itself from "
                    f"{RESERVED_KEYS[key]}: remove it"
                )
    return lines


def one_line(text: str) -> str:
    """A possibly multi-line message as one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _error_line(prefix: str, exc: BaseException) -> str:
    """One line for an exception; with HYDRA_FULL_ERROR=1 the traceback goes to stderr first."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    detail = one_line(exc) or type(exc).__name__
    return f"{prefix}: {detail}"


# -- the data ------------------------------------------------------------------------------


@dataclass
class _Problems:
    """Problem lines grouped by kind: a kind seen in several files is reported once."""

    kinds: dict[tuple[Any, ...], list[str]] = field(default_factory=dict)

    def add(self, kind: tuple[Any, ...], line: str) -> None:
        self.kinds.setdefault(kind, []).append(line)

    def lines(self) -> list[str]:
        out = []
        for lines in self.kinds.values():
            more = f" (and {len(lines) - 1} more files like it)" if len(lines) > 1 else ""
            out.append(lines[0] + more)
        return out


def _duration_tolerance(sample_rate: int) -> float:
    """One sample or 1 ms, whichever is longer."""
    return max(1.0 / sample_rate, 1e-3)


def _check_entry(
    entry: dict[str, Any], where: str, path: Path, sample_rate: int, rate_key: str, out: _Problems
) -> None:
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile reports corrupt files with several exception types
        out.add(("unreadable", where), f"{path}: cannot read audio ({one_line(exc)}) ({where})")
        return
    if info.samplerate != sample_rate:
        out.add(
            ("rate", info.samplerate),
            f"{path}: {info.samplerate} Hz, the model's sample rate is {sample_rate} Hz "
            f"({rate_key})",
        )
    if info.channels != 1:
        out.add(
            ("channels", info.channels),
            f"{path}: {info.channels} channels, the model reads mono audio",
        )
    duration = entry.get("duration")
    if duration is None:
        out.add(("no duration", where), f"{where}: no duration key")
        return
    seconds = info.frames / info.samplerate
    offset = float(entry.get("offset") or 0.0)
    expected = offset + float(duration)
    tol = _duration_tolerance(info.samplerate)
    short = seconds < expected - tol
    if short or (offset == 0.0 and seconds > expected + tol):
        out.add(
            ("length", where),
            f"{path}: {info.frames} samples ({seconds:.4f} s), but {where} says "
            f"duration {duration} s" + (f" from offset {offset} s" if offset else ""),
        )


def check_manifest_audio(
    manifest: Path, sample_rate: int, rate_key: str, out: _Problems
) -> list[float]:
    """Check every entry of one manifest into `out`; returns the durations of the readable ones."""
    if not manifest.is_file():
        out.add(("missing", manifest), f"{manifest}: manifest not found")
        return []
    durations = []
    entries = 0
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        entries += 1
        where = f"{manifest}:{lineno}"
        try:
            entry = json.loads(line)
            path = audio_path(entry, manifest)
        except ValueError as exc:
            out.add(("json", where), f"{where}: not a JSON object ({exc})")
            continue
        except KeyError:
            out.add(("no audio key", where), f"{where}: no audio_filepath key")
            continue
        if not path.is_file():
            out.add(("not found", manifest), f"{path}: audio file not found ({where})")
            continue
        _check_entry(entry, where, path, sample_rate, rate_key, out)
        if entry.get("duration") is not None:
            durations.append(float(entry["duration"]))
    if not entries:
        out.add(("empty", manifest), f"{manifest}: no entries (empty manifest)")
    return durations


def _rate_keys(model_cfg: Mapping[str, Any]) -> tuple[int, list[str]]:
    """The model's sample rate, and a line per section whose own sample rate differs from it."""
    rate = int(model_cfg["sample_rate"])
    lines = []
    for section in ("preprocessor", "train_ds", "validation_ds"):
        own = (model_cfg.get(section) or {}).get("sample_rate")
        if own is not None and int(own) != rate:
            lines.append(f"model.{section}.sample_rate={own} differs from model.sample_rate={rate}")
    return rate, lines


def check_data(model_cfg: Mapping[str, Any]) -> Findings:
    """The manifests and audio files a NEST model config names (train, noise, validation)."""
    found = Findings()
    rate, found.problems = _rate_keys(model_cfg)
    problems = _Problems()
    manifests: dict[str, int] = {}
    train_durations: list[float] = []
    for section, key in (
        ("train_ds", "manifest_filepath"),
        ("train_ds", "noise_manifest"),
        ("validation_ds", "manifest_filepath"),
        ("validation_ds", "noise_manifest"),
    ):
        ds = model_cfg.get(section) or {}
        for manifest in manifest_paths(ds.get(key)):
            durations = check_manifest_audio(manifest, rate, "model.sample_rate", problems)
            manifests[str(manifest)] = len(durations)
            if (section, key) == ("train_ds", "manifest_filepath"):
                train_durations += durations
    found.problems += problems.lines()
    found.problems += _batch_problems(model_cfg.get("train_ds") or {}, train_durations)
    found.checked = {"sample_rate": rate, "manifests": manifests}
    return found


def _batch_problems(train: Mapping[str, Any], durations: list[float]) -> list[str]:
    """With drop_last, fewer usable training clips than a batch means no step is ever trained."""
    if not durations or not train.get("drop_last") or "batch_size" not in train:
        return []
    low = train.get("min_duration")
    high = train.get("max_duration")
    usable = sum(
        (low is None or d >= float(low)) and (high is None or d <= float(high)) for d in durations
    )
    batch = int(train["batch_size"])
    if usable >= batch:
        return []
    return [
        f"model.train_ds.batch_size={batch}: only {usable} training clips lie between "
        f"min_duration {low} and max_duration {high} s, so with drop_last no batch is ever formed"
    ]


# -- the disk --------------------------------------------------------------------------------


def capture_bytes(params: int) -> int:
    """Estimated bytes of one capture step directory (one side) of a model with `params`."""
    return BYTES_PER_PARAM * params + FIXED_BYTES


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_disk(params: int, captures: int, results: Path) -> Findings:
    """The sweep's captures (`captures` = seeds x steps, on both sides) fit into results/'s disk."""
    per_step = capture_bytes(params)
    need = per_step * captures * SIDES
    folder = results
    while not folder.exists() and folder != folder.parent:  # results/ may not exist yet
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    found = Findings(checked={"parameters": params, "need_bytes": need, "free_bytes": free})
    if need > free:
        found.problems.append(
            f"{results}: the captures need about {_gb(need)} ({captures} seed x step captures "
            f"x {SIDES} sides x {_gb(per_step)} for {params:,} parameters), "
            f"only {_gb(free)} ({free} bytes) free"
        )
    return found


# -- the config and the model --------------------------------------------------------------


def compose(config_path: str, config_name: str, overrides: list[str]) -> tuple[Any, list[str]]:
    """The capture's config (nestalign.runner.load_config), or None and Hydra's message."""
    from hydra.errors import HydraException

    from nestalign.runner import load_config

    try:
        return load_config(config_path, config_name, overrides), []
    except HydraException as exc:
        return None, [_error_line("config", exc)]
    except SystemExit as exc:  # load_config's own one-line messages start with "config: "
        message = str(exc)
        return None, [message if message.startswith("config: ") else f"config: {message}"]


def load_build(capture_script: Path) -> Any:
    """The `build(model_cfg, trainer)` function of a capture script, imported without running it."""
    spec = importlib.util.spec_from_file_location(f"_capture_{capture_script.stem}", capture_script)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{capture_script}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def check_model(capture_script: Path, cfg: Any, framework: str) -> tuple[int | None, list[str]]:
    """Build the framework's Trainer (from the config's `trainer`, on the CPU), model and
    optimizer, as the capture does, without training.

    Returns the parameter count, or None and one line with the framework's own message.
    """
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    build = load_build(capture_script)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no accelerator banner
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    try:
        trainer = pl.Trainer(**kwargs)
        model = build(cfg.model, trainer)
        model.trainer = trainer
        model.configure_optimizers()
    except Exception as exc:  # the framework's own refusal, whatever its type
        return None, [_error_line(f"{framework} refuses the config", exc)]
    return sum(p.numel() for p in model.parameters()), []


def validate(
    framework: str,
    capture_script: Path,
    config_path: str,
    config_name: str,
    overrides: list[str],
    origins: Mapping[str, Iterable[str]],
    captures: int,
    results: Path,
) -> Findings:
    """Every check above for one framework; the later checks need the composed config."""
    found = Findings(problems=reserved_overrides(origins))
    found.checked = {"framework": framework, "overrides": overrides}
    cfg, problems = compose(config_path, config_name, overrides)
    found.problems += problems
    if cfg is None:
        return found
    data = check_data(cfg.model)
    found.problems += data.problems
    found.checked["data"] = data.checked
    params, problems = check_model(capture_script, cfg, framework)
    found.problems += problems
    if params is not None:
        disk = check_disk(params, captures, results)
        found.problems += disk.problems
        found.checked["disk"] = disk.checked
    return found
