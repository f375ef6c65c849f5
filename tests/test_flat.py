"""The flat reader (nestalign.flat): an artifact read through its index and a memory map gives
exactly what torch.load gives, never unpickles, and falls back to torch.load where it cannot."""

from __future__ import annotations

import math
import resource

import pytest
import torch

from nestalign import artifacts as art
from nestalign import flat
from nestalign.compare.reader import StepSource


def same(a, b, path: str = "") -> None:
    """Equal containers and plain values, tensors of equal dtype, shape and bytes."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        bytes_a = a.contiguous().reshape(-1).view(torch.uint8)
        bytes_b = b.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bytes_a, bytes_b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (path, a, b)


def _awkward() -> dict:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g)
    return {
        "transposed": base.t(),
        "offset view": base[3:, 2:],  # torch.save writes the whole storage
        "strided": base[::2, ::3],
        "same storage twice": [base, base[1]],
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "bool": torch.rand(5, generator=g) > 0.5,
        "half": torch.randn(3, generator=g).half(),
        "bfloat16": torch.randn(3, generator=g).bfloat16(),
        "complex": torch.randn(2, 2, dtype=torch.complex64, generator=g),
        "plain": {"nan": math.nan, "inf": -math.inf, "n": 3, "s": "x", "none": None, "b": True},
    }


def _write(tmp_path, obj, once: bool = False):
    writer = art.StepWriter(tmp_path, 0)
    writer.tensors(art.LAYERS, obj, once=once)
    return writer.commit()


def test_awkward_containers_read_flat_as_torch_load_reads_them(tmp_path, monkeypatch):
    step = _write(tmp_path, _awkward())
    assert art.LAYERS in art.load_json(step / art.INDEX)["spans"]
    monkeypatch.setattr(torch, "load", None)  # the flat path never unpickles
    got = StepSource(step).tensors(art.LAYERS)
    monkeypatch.undo()
    same(got, art.load_tensors(step / art.LAYERS))
    assert getattr(got["offset view"], art.FINGERPRINT)["shape"] == [5, 4]


def test_values_stored_once_read_flat(tmp_path):
    big = torch.randn(64, 64)
    calls = [{"outputs": big}, {"inputs": [big.clone()]}, {"x": big + 1}]
    step = _write(tmp_path, calls, once=True)
    same(StepSource(step).tensors(art.LAYERS), art.load_tensors(step / art.LAYERS))


def test_tuples_and_other_keys_are_not_read_flat(tmp_path):
    """The skeleton would turn them into lists and str keys: torch.load reads such a file."""
    step = _write(tmp_path, {"pair": (torch.ones(2), torch.zeros(2)), "n": {1: torch.ones(1)}})
    assert art.LAYERS not in art.load_json(step / art.INDEX)["spans"]
    got = StepSource(step).tensors(art.LAYERS)
    assert isinstance(got["pair"], tuple) and list(got["n"]) == [1]


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    step = _write(tmp_path, {"w": torch.randn(1000)})
    path = step / art.LAYERS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    index = art.load_json(step / art.INDEX)
    index["stamps"][art.LAYERS] = art.file_stamp(path)  # as if the index described it
    art.save_json(step / art.INDEX, index)
    with pytest.raises(art.ArtifactError, match=str(path)):
        StepSource(step).tensors(art.LAYERS)


def test_released_pages_leave_the_process_and_the_values_stay(tmp_path):
    step = _write(tmp_path, {"w": torch.randn(16 << 20)})  # 64 MiB
    w = StepSource(step).tensors(art.LAYERS)["w"]
    expected = float(w.double().sum())

    def resident() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    before = resident()
    flat.release(w)
    assert before - resident() > 48 << 20
    assert float(w.double().sum()) == expected  # read again from the page cache
