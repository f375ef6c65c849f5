"""Artifact files of one captured training step: names, atomic writes, safe loading.

A step directory holds (see docs/artifacts.md for the full format):

    metadata.json, model_structure.json,
    batch.pt, forward_output.pt, loss.pt,
    parameter_gradients.pt, parameter_weights.pt, layer_outputs.pt,
    initial_weights.pt, initial_rng.pt (the run's state before its first forward),
    training_state.pt (optimizer, schedulers, counters, data position, generators: resume.py),
    config.yaml (the composed config, when captured through nestalign.runner)

Every ``.pt`` file holds plain containers (dict, list, str, numbers, None) and tensors only, so it
loads with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

METADATA = "metadata.json"
STRUCTURE = "model_structure.json"
BATCH = "batch.pt"
FORWARD = "forward_output.pt"
LOSS = "loss.pt"
GRADS = "parameter_gradients.pt"
WEIGHTS = "parameter_weights.pt"
LAYERS = "layer_outputs.pt"
INITIAL_WEIGHTS = "initial_weights.pt"
INITIAL_RNG = "initial_rng.pt"
TRAINING_STATE = "training_state.pt"
CONFIG = "config.yaml"  # the run's composed config (captures made through capture_main)

TENSOR_FILES = (
    BATCH,
    FORWARD,
    LOSS,
    GRADS,
    WEIGHTS,
    LAYERS,
    INITIAL_WEIGHTS,
    INITIAL_RNG,
    TRAINING_STATE,
)
ALL_FILES = (METADATA, STRUCTURE, *TENSOR_FILES)


class ArtifactError(RuntimeError):
    """An artifact is missing, truncated or not in the expected format."""


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"step_{step}"


def to_plain(obj: Any) -> Any:
    """Detached CPU copies of tensors inside plain containers; dataclasses become dicts.

    Tuples become lists, and objects that are neither containers, tensors nor scalars become
    their ``repr`` so that the result always loads with ``weights_only=True``.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through a temporary file and a rename.

    torch names the archive inside the file after the file name when given a path; saving into
    an open file object names it "archive", so identical content gives identical bytes.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    try:
        _atomic(Path(path), write)
    except (OSError, RuntimeError) as exc:  # a full disk reaches torch's writer as RuntimeError
        raise ArtifactError(f"{path}: cannot be written ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def load_tensors(path: str | os.PathLike, mmap: bool = False) -> Any:
    """Load a ``.pt`` artifact safely; a missing or damaged file raises ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing artifact")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ArtifactError(f"{path}: cannot be loaded as a tensor artifact ({exc})") from exc


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing artifact")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc


class StepWriter:
    """Writes one step directory so that it only ever appears complete.

    Files go to a hidden staging directory beside the target, each through a temporary file;
    ``commit`` renames the staging directory into place (replacing an older capture).
    """

    def __init__(self, run_dir: str | os.PathLike, step: int):
        self.final = step_dir(run_dir, step)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".{self.final.name}.*"):  # left by a killed run
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))

    def tensors(self, name: str, obj: Any) -> None:
        try:
            save_tensors(self.stage / name, obj)
        except ArtifactError as exc:  # name the file the user will look for, not the staging
            cause = exc.__cause__ or exc
            raise ArtifactError(
                f"{self.final / name}: cannot be written ({_first_line(cause)})"
            ) from cause

    def json(self, name: str, obj: Any) -> None:
        save_json(self.stage / name, obj)

    def text(self, name: str, text: str) -> None:
        _atomic(self.stage / name, lambda tmp: Path(tmp).write_text(text))

    def commit(self) -> Path:
        self.stage.chmod(0o755)
        for file in self.stage.iterdir():
            file.chmod(0o644)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.stage, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
