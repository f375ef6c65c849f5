"""Tensor artifacts read as flat, memory-mapped files: no unpickling, pages released as they go.

A ``.pt`` artifact is a zip archive whose members are stored uncompressed: ``data.pkl`` (the
containers, pickled) and one member per tensor storage, at a 64-byte aligned offset. At capture
time, right after ``torch.save`` wrote the file, ``layout_of`` records where each tensor's bytes
lie in it (byte offset and strides, one ``span`` per tensor in ``walk_tensors`` order); with the
artifact's skeleton (artifacts.skeleton_of) this is all a reader needs. ``load`` maps the file
and builds the containers from the skeleton, each tensor a view of the mapping: nothing is
unpickled, and no byte is read until a compare touches it. ``release`` drops a tensor's pages
from the process after its comparison, so a compare holds about one tensor pair in memory.

The file stays an ordinary ``.pt`` (``torch.load(weights_only=True)`` reads it as before); a
file without spans in its index, or whose stamp changed, is read through torch.load.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from nestalign import artifacts as art

SPAN = "_nestalign_span"  # the attribute ``load`` gives each tensor: (mapping, start, length)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_PLAIN = (type(None), bool, int, float, str)


def _plain(obj: Any) -> bool:
    """Whether the skeleton gives back exactly ``obj``'s containers (str-keyed dicts, lists,
    JSON scalars); a tuple or another key type would come back changed."""
    if isinstance(obj, torch.Tensor):
        return obj.layout == torch.strided and obj.device.type == "cpu"
    if type(obj) is dict:
        return all(type(k) is str and _plain(v) for k, v in obj.items())
    if type(obj) is list:
        return all(_plain(v) for v in obj)
    return type(obj) in _PLAIN


def _storage_offsets(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of each storage member ``.../data/<key>``, indexed by key."""
    found: dict[int, tuple[int, int]] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            head, _, key = info.filename.rpartition("/")
            if not (head == "data" or head.endswith("/data")) or not key.isdigit():
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{info.filename} is compressed")
            fh.seek(info.header_offset)
            sig, name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
            if sig != b"PK\x03\x04":
                raise ValueError(f"{info.filename}: no local header")
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            found[int(key)] = (start, info.file_size)
    if sorted(found) != list(range(len(found))):
        raise ValueError("storage keys are not 0..n-1")
    return [found[k] for k in range(len(found))]


def layout_of(path: str | os.PathLike, obj: Any) -> list[list[int]] | None:
    """Per tensor of ``obj`` (just written to ``path`` by ``torch.save``): [byte offset of its
    first element in the file, *strides]. None when the file cannot be read flat (containers the
    skeleton would change, a storage layout other than the one torch.save writes here).

    torch.save numbers storages in the order the pickler first meets them, which is
    ``walk_tensors`` order; each storage member's size is checked against that numbering."""
    if not _plain(obj):
        return None
    keys: dict[int, int] = {}
    sizes: list[int] = []
    placed: list[tuple[int, torch.Tensor]] = []
    for t in art.walk_tensors(obj):
        storage = t.untyped_storage()
        key = keys.setdefault(storage._cdata, len(keys))
        if key == len(sizes):
            sizes.append(storage.nbytes())
        placed.append((key, t))
    try:
        members = _storage_offsets(Path(path))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if [size for _, size in members] != sizes:
        return None
    return [
        [members[key][0] + t.storage_offset() * t.element_size(), *t.stride()] for key, t in placed
    ]


def _view(mm: mmap.mmap, entry: dict[str, Any], span: list[int], path: Path) -> torch.Tensor:
    dtype = getattr(torch, entry["dtype"])
    shape, start, stride = entry["shape"], span[0], span[1:]
    if len(stride) != len(shape):
        raise art.ArtifactError(f"{path}: tensor_index.json spans do not fit the index")
    if 0 in shape:
        return torch.empty(shape, dtype=dtype)
    count = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    length = count * dtype.itemsize
    if start < 0 or start + length > len(mm):
        raise art.ArtifactError(f"{path}: a tensor lies outside the file (truncated?)")
    flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=start)
    t = flat.as_strided(shape, stride)
    setattr(t, SPAN, (mm, start, length))
    setattr(t, art.FINGERPRINT, entry)
    return t


def load(
    path: str | os.PathLike, skeleton: Any, entries: list[dict[str, Any]], spans: list[list[int]]
) -> Any:
    """The artifact at ``path`` from its skeleton, fingerprints and spans, each tensor a view of a
    private read-only mapping of the file (with its fingerprint attached, as attach_index)."""
    path = Path(path)
    if len(spans) != len(entries):
        raise art.ArtifactError(f"{path}: tensor_index.json spans do not fit the index")
    try:
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # writable: no torch warning
    except (OSError, ValueError) as exc:
        raise art.ArtifactError(f"{path}: cannot be mapped ({exc})") from exc
    views: dict[int, torch.Tensor] = {}

    def tensor(i: int) -> torch.Tensor:
        if i not in views:
            views[i] = _view(mm, entries[i], spans[i], path)
        return views[i]

    try:
        return art.fill_skeleton(skeleton, tensor)
    except (IndexError, KeyError, TypeError, AttributeError) as exc:
        why = f"{path}: tensor_index.json does not describe it ({exc!r})"
        raise art.ArtifactError(why) from exc


_PAGE = mmap.PAGESIZE


def release(*tensors: Any) -> None:
    """Drop the pages of mapped tensors (``load``) from this process; they are read again from
    the page cache if touched later. Other tensors are left alone."""
    for t in tensors:
        span = getattr(t, SPAN, None)
        if span is None:
            continue
        mm, start, length = span
        first = start - start % _PAGE
        end = start + length
        end -= end % _PAGE  # pages shared with the next tensor stay
        if end > first:
            mm.madvise(mmap.MADV_DONTNEED, first, end - first)
