"""Artifact files of one captured training step: names, atomic writes, safe loading.

A step directory holds (see docs/artifacts.md for the full format):

    metadata.json, model_structure.json,
    batch.pt, forward_output.pt, loss.pt,
    parameter_gradients.pt, parameter_weights.pt, layer_outputs.pt,
    initial_weights.pt, initial_rng.pt (the run's state before its first forward),
    training_state.pt (optimizer, schedulers, counters, data position, generators: resume.py),
    config.yaml (the composed config, when captured through nestalign.runner)

Every ``.pt`` file holds plain containers (dict, list, str, numbers, None) and tensors only, so it
loads with ``torch.load(path, weights_only=True)``. ``tensor_index.json`` holds, per ``.pt`` file,
a fingerprint of each tensor in the order ``walk_tensors`` visits them (dtype, shape, 128-bit
xxh3 hash of its bytes, largest finite magnitude, NaN and Inf counts): a compare skips the bytes
of tensors whose fingerprints agree (``attach_index``, compare.reader.StepSource). It also holds
each file's skeleton (``skeleton_of``) and where each tensor's bytes lie in it (nestalign.flat),
so a compare maps the file instead of unpickling it. A fingerprint capture
(``StepWriter(fingerprint=True)``) writes no ``.pt`` file: its index adds each tensor's
``tensor_stats``, read by nestalign.fingerprints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import xxhash

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
INDEX = "tensor_index.json"  # per tensor file, each tensor's fingerprint (tensor_fingerprint)
HASH = "xxh3_128"  # a fingerprint's hash: xxh3's 128 bits (SHA-256 ran at a tenth of its speed)
STATS_CHUNK = 1 << 17  # elements per float64 piece of tensor_stats
TENSOR_MARK = "__tensor__"  # a tensor's place in an artifact's skeleton (skeleton_of)
FLOAT_MARK = "__float__"  # a non-finite float in a skeleton (JSON has none)
FINGERPRINT = "_nestalign_fingerprint"  # the attribute load_indexed gives each loaded tensor

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
ALL_FILES = (METADATA, STRUCTURE, *TENSOR_FILES, INDEX)


class ArtifactError(RuntimeError):
    """An artifact is missing, truncated or not in the expected format."""


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"step_{step}"


def to_plain(obj: Any, copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """Detached CPU copies of tensors inside plain containers; dataclasses become dicts.

    Tuples become lists, and objects that are neither containers, tensors nor scalars become
    their ``repr`` so that the result always loads with ``weights_only=True``. ``copy`` makes
    the tensors' copies instead (a recorder that stores a repeated tensor once).
    """
    if isinstance(obj, torch.Tensor):
        return copy(obj) if copy is not None else obj.detach().to("cpu", copy=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), copy) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, copy) for v in obj]
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
    an open file object names it "archive", so identical content gives identical bytes. The zip
    records carry no CRC-32 (torch.load never checks it; tensor_index.json holds each tensor's
    hash): computing it took about half of the writing time of a step's module calls.
    """

    def write(tmp: str) -> None:
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
        finally:
            torch.serialization.set_crc32_options(crc)

    try:
        _atomic(Path(path), write)
    except (OSError, RuntimeError) as exc:  # a full disk reaches torch's writer as RuntimeError
        raise ArtifactError(f"{path}: cannot be written ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def save_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> None:
    """JSON through a temporary file; ``compact``: one line, written by json's C encoder (an
    indented dump goes through its Python encoder, seconds for a large index)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


def load_tensors(path: str | os.PathLike, mmap: bool = False) -> Any:
    """Load a ``.pt`` artifact safely; a missing or damaged file raises ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing artifact")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ArtifactError(f"{path}: cannot be loaded as a tensor artifact ({exc})") from exc


def walk_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors inside plain containers, depth first in container order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from walk_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from walk_tensors(value)


def magnitude(x: torch.Tensor, bounds: tuple | None = None) -> tuple[float, bool]:
    """(the largest finite magnitude of a real tensor, 0 when it has none; whether every element
    is finite), in one pass when all are; ``bounds``: its ``torch.aminmax``, taken already."""
    if x.numel() == 0:
        return 0.0, True
    lo, hi = torch.aminmax(x) if bounds is None else bounds  # no temporary
    top = max(-float(lo), float(hi))
    if math.isfinite(top):
        return top, True
    kept = x[torch.isfinite(x)]
    return (float(kept.abs().max()) if kept.numel() else 0.0), False


def digest(entry: dict[str, Any] | None) -> tuple[str, str] | None:
    """(algorithm, hex digest) of a fingerprint; None when it has none. Captures before the
    xxh3 hash hold SHA-256's first 128 bits under ``sha256``."""
    for key in (HASH, "sha256"):
        if entry is not None and key in entry:
            return key, entry[key]
    return None


def same_bytes(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two fingerprints show the same bytes, dtype and shape: a digest of the same
    algorithm on both sides, and equal (fingerprints of two hash kinds are never equal)."""
    da = digest(a)
    return (
        da is not None
        and da == digest(b)
        and a["dtype"] == b["dtype"]
        and list(a["shape"]) == list(b["shape"])
    )


@functools.cache
def _scanner() -> Callable | None:
    """``nestalign.tensor_scan.scan`` where numba is installed (imported on first use: a
    compare that reads no fingerprint-less tensor never pays for numba), else None."""
    try:
        from nestalign.tensor_scan import scan
    except ImportError:
        return None
    return scan


def load_scanner() -> None:
    """Import the scan and load (or compile) its code now, before training: on the writer
    thread, numba's import and loading would hold up the first captured step (about 0.6 s)."""
    scan = _scanner()
    if scan is not None:
        for dtype in (torch.float32, torch.float64):  # a NaN: both of its loops run
            scan(torch.tensor([0.0, math.nan], dtype=dtype).numpy())


def tensor_fingerprint(t: torch.Tensor, stats: bool = False) -> dict[str, Any]:
    """dtype, shape, the 128-bit xxh3 hash of the contiguous bytes (hex), ``scale`` (the largest
    finite magnitude as the compare's metrics define it) and the NaN and Inf counts; ``stats``:
    with ``tensor_stats`` as ``stats``. float32 and float64 tensors take these numbers from one
    compiled pass (``nestalign.tensor_scan``) where numba is installed; other dtypes, and every
    dtype without numba, from torch (one min/max pass serves the scale and the statistics)."""
    t = t.detach().resolve_conj().resolve_neg()
    flat = t.reshape(-1).contiguous()
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    entry: dict[str, Any] = {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        HASH: xxhash.xxh3_128_hexdigest(memoryview(raw.numpy())),
        "scale": None,
        "nan": 0,
        "inf": 0,
    }
    scan = _scanner() if t.dtype in (torch.float32, torch.float64) and flat.numel() else None
    if scan is not None:
        entry["scale"], entry["nan"], entry["inf"], numbers = scan(flat.numpy())
        if stats:
            entry["stats"] = numbers
        return entry
    bounds = None
    if t.dtype == torch.bool:
        entry["scale"] = float(flat.numel() > 0)
    elif not t.is_complex():
        bounds = torch.aminmax(flat) if flat.numel() else None
        entry["scale"], finite = magnitude(flat, bounds)
        if not finite:
            nan = int(torch.isnan(flat).sum())
            entry.update(nan=nan, inf=flat.numel() - int(torch.isfinite(flat).sum()) - nan)
    if stats:
        entry["stats"] = tensor_stats(t, bounds)
    return entry


def tensor_stats(t: torch.Tensor, bounds: tuple | None = None) -> dict[str, float] | None:
    """Sum, sum of magnitudes, L2 norm, minimum and maximum (float64) of a real tensor whose
    elements and sums are all finite; None otherwise (complex, empty, NaN/Inf present, or a
    float64 tensor whose squares overflow). Each is within known bounds of the other side's when
    two tensors agree elementwise (nestalign.fingerprints).
    ``bounds``: the tensor's ``torch.aminmax``, taken already.
    """
    if t.is_complex() or t.numel() == 0:
        return None
    x = t.detach().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    lo, hi = torch.aminmax(x) if bounds is None else bounds
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):  # NaN propagates
        return None
    total = magnitudes = squares = 0.0
    for start in range(0, x.numel(), STATS_CHUNK):  # float64 copies of cache-sized pieces
        c = x[start : start + STATS_CHUNK].to(torch.float64)
        total += float(c.sum())
        squares += float(torch.dot(c, c))
        magnitudes += float(c.abs_().sum())
    if not (math.isfinite(magnitudes) and math.isfinite(squares)):  # float64 near its range
        return None
    return {
        "sum": total,
        "abs_sum": magnitudes,
        "norm": math.sqrt(squares),
        "min": float(lo),
        "max": float(hi),
    }


def file_stamp(path: str | os.PathLike) -> list[int]:
    """[size, mtime in ns]: an index describes a file only while its stamp is unchanged (a file
    written again after its index, by hand or by a tool, is read in full)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def index_of(obj: Any, stats: bool = False) -> list[dict[str, Any]]:
    """The fingerprints of an artifact's tensors, in ``walk_tensors`` order (a tensor object that
    occurs several times is hashed once); ``stats``: with ``tensor_stats`` as ``stats``."""
    done: dict[int, dict[str, Any]] = {}
    for t in walk_tensors(obj):
        if id(t) not in done:
            done[id(t)] = tensor_fingerprint(t, stats)
    return [done[id(t)] for t in walk_tensors(obj)]


def skeleton_of(obj: Any) -> Any:
    """An artifact's containers and plain values as JSON, each tensor replaced by
    ``{TENSOR_MARK: i}`` (its position in ``walk_tensors`` order, i.e. in the index)."""
    count = 0

    def build(x: Any) -> Any:
        nonlocal count
        if isinstance(x, torch.Tensor):
            count += 1
            return {TENSOR_MARK: count - 1}
        if isinstance(x, dict):
            return {str(k): build(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [build(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return {FLOAT_MARK: repr(x)}
        return x

    return build(obj)


def fill_skeleton(skeleton: Any, leaf: Callable[[int], Any]) -> Any:
    """A skeleton (``skeleton_of``) with each tensor mark replaced by ``leaf(i)`` and each
    non-finite float restored."""
    if isinstance(skeleton, dict):
        if len(skeleton) == 1:
            if TENSOR_MARK in skeleton:
                return leaf(skeleton[TENSOR_MARK])
            if FLOAT_MARK in skeleton:
                return float(skeleton[FLOAT_MARK])
        return {k: fill_skeleton(v, leaf) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [fill_skeleton(v, leaf) for v in skeleton]
    return skeleton


def stored_once(obj: Any, entries: list[dict[str, Any]]) -> Any:
    """``obj`` with every tensor whose fingerprint (bytes, dtype, shape) was seen before in it
    replaced by that first tensor, so that the file holds each value once."""
    first: dict[tuple, torch.Tensor] = {}
    todo = iter(entries)

    def rebuild(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            e = next(todo)
            return first.setdefault((digest(e), e["dtype"], tuple(e["shape"])), x)
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(rebuild(v) for v in x)
        return x

    return rebuild(obj)


def attach_index(obj: Any, entries: list[dict[str, Any]]) -> bool:
    """Give each tensor of a loaded artifact its fingerprint (attribute ``FINGERPRINT``).

    Nothing is attached when the index does not describe these tensors (another count, dtype or
    shape): the compare then reads them all. Returns whether it was attached."""
    tensors = list(walk_tensors(obj))
    fits = len(tensors) == len(entries) and all(
        e.get("shape") == list(t.shape) and e.get("dtype") == str(t.dtype).removeprefix("torch.")
        for t, e in zip(tensors, entries, strict=True)
    )
    if fits:
        for t, e in zip(tensors, entries, strict=True):
            setattr(t, FINGERPRINT, e)
    return fits


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
    ``fingerprint``: no tensor bytes are written, only the index (each fingerprint with its
    ``tensor_stats``) and each artifact's skeleton (docs/artifacts.md, fingerprint captures).
    """

    def __init__(self, run_dir: str | os.PathLike, step: int, fingerprint: bool = False):
        self.fingerprint = fingerprint
        self.skeletons: dict[str, Any] = {}
        self.final = step_dir(run_dir, step)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".{self.final.name}.*"):  # left by a killed run
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        self.index: dict[str, list[dict[str, Any]]] = {}
        self.spans: dict[str, list[list[int]]] = {}  # full mode: flat.layout_of per file

    def tensors(self, name: str, obj: Any, once: bool = False) -> None:
        """Write one tensor artifact; ``once``: each value in it stored once (``stored_once``),
        for records nothing mutates after loading (a training state must not alias: an
        optimizer steps its tensors in place)."""
        if self.fingerprint:
            self.index[name] = index_of(obj, stats=True)
            self.skeletons[name] = skeleton_of(obj)
            return
        from nestalign import flat  # flat reads what this module writes

        try:
            # Hashed, then written: on two cores, hashing in a thread beside torch.save and
            # training slowed all three (a Small step's writing took 1.30 s against 1.06 s).
            entries = index_of(obj)
            if once:  # the fingerprints decide what is stored
                obj = stored_once(obj, entries)
            save_tensors(self.stage / name, obj)
            self.index[name] = entries
            spans = flat.layout_of(self.stage / name, obj)
            if spans is not None:
                self.spans[name] = spans
                self.skeletons[name] = skeleton_of(obj)
        except ArtifactError as exc:  # name the file the user will look for, not the staging
            cause = exc.__cause__ or exc
            raise ArtifactError(
                f"{self.final / name}: cannot be written ({_first_line(cause)})"
            ) from cause

    def reuse(self, name: str, other: StepWriter) -> None:
        """The file ``name`` as ``other``, a committed step of the same run, wrote it (the run's
        initial state, the same in every step): a hard link to that file and its index entries,
        neither written nor hashed again; copied where the filesystem cannot link."""
        self.index[name] = other.index[name]
        for own, theirs in ((self.skeletons, other.skeletons), (self.spans, other.spans)):
            if name in theirs:
                own[name] = theirs[name]
        if self.fingerprint:
            return
        try:
            os.link(other.final / name, self.stage / name)
        except OSError:
            shutil.copy2(other.final / name, self.stage / name)

    def json(self, name: str, obj: Any) -> None:
        save_json(self.stage / name, obj)

    def text(self, name: str, text: str) -> None:
        _atomic(self.stage / name, lambda tmp: Path(tmp).write_text(text))

    def commit(self) -> Path:
        if self.fingerprint:
            index = {"format": 1, "mode": "fingerprint", "files": self.index}
            index["skeletons"] = self.skeletons
        else:
            stamps = {name: file_stamp(self.stage / name) for name in self.index}
            index = {"format": 1, "files": self.index, "stamps": stamps}
            index |= {"skeletons": self.skeletons, "spans": self.spans}
        save_json(self.stage / INDEX, index, compact=True)
        self.stage.chmod(0o755)
        for file in self.stage.iterdir():
            file.chmod(0o644)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.stage, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
