"""A captured step directory: this project's layout, or the original tool's (pickles)."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from nestalign import artifacts as art
from nestalign import flat


class StepSource:
    """One captured step directory; artifacts load one at a time and are never cached."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False, use_index: bool = True):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.use_index = use_index
        self._index: dict[str, Any] | None = None
        self._index_data: dict[str, Any] = {}  # tensor_index.json as read (skeletons, spans)
        if not self.path.is_dir():
            raise art.ArtifactError(f"{self.path}: not a step directory")
        self.original = (self.path / "layer_outputs.pkl").exists() and not (
            self.path / art.LAYERS
        ).exists()

    def has(self, name: str) -> bool:
        """Whether the artifact file ``name`` exists in this step directory."""
        return (self.path / name).is_file()

    def metadata(self) -> dict[str, Any]:
        if (self.path / art.METADATA).exists():
            return art.load_json(self.path / art.METADATA)
        meta: dict[str, Any] = {}
        for path in (self.path.parent / "metadata.pkl", self.path / "metadata.pkl"):
            if self.original and path.exists():
                data = self._pickle(path)
                meta.update(data if isinstance(data, dict) else {})
        if "step" not in meta and self.path.name.removeprefix("step_").isdigit():
            meta["step"] = int(self.path.name.removeprefix("step_"))
        return meta

    def structure(self) -> dict[str, Any]:
        if not self.original:
            return art.load_json(self.path / art.STRUCTURE)
        for cand in (self.path / "model_structure.pkl", self.path.parent / "model_structure.pkl"):
            if cand.exists():
                return _original_structure(self._pickle(cand), cand)
        raise art.ArtifactError(f"{self.path}: no model_structure.pkl here or in the run dir")

    def tensors(self, name: str) -> Any:
        path = self.path / name
        if name == art.LAYERS and self.original:
            return _original_layers(self._pickle(self.path / "layer_outputs.pkl"))
        entries = self.index().get(name)
        spans = self._index_data.get("spans", {}).get(name) if entries is not None else None
        skeleton = self._index_data.get("skeletons", {}).get(name)
        if spans is not None and skeleton is not None:
            try:
                return flat.load(path, skeleton, entries, spans)
            except art.ArtifactError:  # an index that does not describe the file: torch.load
                pass
        try:
            obj = art.load_tensors(path, mmap=True)
        except art.ArtifactError:
            if not (self.original and self.allow_pickle and path.is_file()):
                raise
            return self._pickle(path, torch_file=True)
        if entries is not None:
            art.attach_index(obj, entries)
        return obj

    def index(self) -> dict[str, list[dict[str, Any]]]:
        """The step's tensor fingerprints per file, for the files unchanged since they were
        indexed (empty for captures made without an index)."""
        if self._index is None:
            found = self.use_index and self.has(art.INDEX)
            data = art.load_json(self.path / art.INDEX) if found else {}
            self._index_data = data if isinstance(data, dict) else {}
            files = data.get("files") if isinstance(data, dict) else None
            stamps = data.get("stamps") if isinstance(data, dict) else None
            self._index = {
                name: entries
                for name, entries in (files or {}).items()
                if isinstance(stamps, dict)
                and self.has(name)
                and stamps.get(name) == art.file_stamp(self.path / name)
            }
        return self._index

    def _pickle(self, path: Path, torch_file: bool = False) -> Any:
        if not self.allow_pickle:
            raise art.ArtifactError(
                f"{path}: a pickle this project did not write; loading it runs code from the "
                "file, so it needs --allow-pickle"
            )
        warnings.warn(
            f"unpickling {path} (--allow-pickle): only do this for files you trust", stacklevel=2
        )
        try:
            if torch_file:
                return torch.load(path, map_location="cpu", weights_only=False)
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except Exception as exc:
            raise art.ArtifactError(f"{path}: cannot be unpickled ({exc})") from exc


def _original_structure(data: Any, path: Path) -> dict[str, Any]:
    params = data.get("parameters") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise art.ArtifactError(f"{path}: expected a dict with 'parameters'")
    entries = []
    for name, info in params.items():
        info = info if isinstance(info, dict) else {}
        entries.append(
            {
                "name": str(name),
                "kind": "parameter",
                "shape": [int(s) for s in info.get("shape", [])],
                "dtype": str(info.get("dtype", "")).removeprefix("torch."),
                "requires_grad": bool(info.get("requires_grad", True)),
            }
        )
    return {"entries": entries}


def _original_layers(data: Any) -> list[dict[str, Any]]:
    """The original tool's {name: {forward_outputs, forward_inputs}} as module calls."""
    if not isinstance(data, dict):
        raise art.ArtifactError("layer_outputs.pkl: expected a dict of layer name -> record")
    calls = []
    for i, (name, rec) in enumerate(data.items()):
        rec = rec if isinstance(rec, dict) else {"forward_outputs": rec}
        inputs = rec.get("forward_inputs")
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        calls.append(
            {
                "name": str(name),
                "call": 0,
                "type": "",
                "parent": None,
                "start": i,
                "end": i,
                "input_names": [f"arg{k}" for k in range(len(inputs))],
                "inputs": inputs if rec.get("forward_inputs") is not None else [],
                "outputs": rec.get("forward_outputs"),
                "grad_outputs": None,
            }
        )
    return calls
