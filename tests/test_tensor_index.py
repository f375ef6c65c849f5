"""Tensor fingerprints (tensor_index.json): a compare skips the bytes of tensors whose capture
fingerprints agree, and gets exactly what reading them would give."""

from __future__ import annotations

import math

import pytest
import torch

from captures import nest_capture
from nestalign import artifacts as art
from nestalign import metrics
from nestalign.compare import compare_steps, load_tolerances
from nestalign.compare.reader import StepSource
from nestalign.compare.tolerances import tensor_scale
from nestalign.metrics import compare_tensors


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.randn(50, generator=g)
    special[[3, 7]] = math.nan
    special[11], special[12] = math.inf, -math.inf
    return {
        "float32": torch.randn(3, 5, 7, generator=g),
        "nan and inf": special,
        "all nan": torch.full((4,), math.nan),
        "zeros": torch.zeros(6),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(-2.5),
        "float64": torch.randn(9, dtype=torch.float64, generator=g),
        "float16": torch.randn(9, generator=g).half(),
        "bfloat16": torch.randn(9, generator=g).bfloat16(),
        "transposed view": torch.randn(4, 6, generator=g).t(),
        "int64": torch.randint(-9, 9, (12,), generator=g),
        "bool": torch.rand(12, generator=g) > 0.5,
    }


def _with_fingerprint(t: torch.Tensor) -> torch.Tensor:
    copy = t.clone()
    setattr(copy, art.FINGERPRINT, art.tensor_fingerprint(t))
    return copy


@pytest.mark.parametrize("name", list(_cases()))
def test_skipping_an_identical_pair_gives_what_reading_it_gives(name):
    t = _cases()[name]
    read = compare_tensors(t, t.clone(), 1e-5, 1e-5)
    skipped = compare_tensors(_with_fingerprint(t), _with_fingerprint(t), 1e-5, 1e-5)
    assert skipped.pop("cosine") == pytest.approx(read.pop("cosine"), abs=1e-12)
    assert skipped == read
    if t.is_floating_point() and t.numel():
        assert tensor_scale(_with_fingerprint(t)) == tensor_scale(t)


def test_the_fingerprint_is_of_the_values_not_their_memory_order():
    t = torch.randn(4, 6)
    assert art.tensor_fingerprint(t.t()) == art.tensor_fingerprint(t.t().contiguous())
    bumped = t.clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(math.inf))
    assert art.tensor_fingerprint(bumped)[art.HASH] != art.tensor_fingerprint(t)[art.HASH]


def test_a_lazily_conjugated_or_negated_tensor_is_fingerprinted_by_its_values():
    z = torch.randn(5, dtype=torch.complex64)
    for lazy in (z.conj(), torch._neg_view(z)):  # a flag on the tensor, not new bytes
        assert art.tensor_fingerprint(lazy) == art.tensor_fingerprint(lazy.clone())


def test_fingerprints_agree_only_by_one_hash_of_the_same_bytes():
    t = torch.randn(5)
    new = art.tensor_fingerprint(t)
    legacy = {k: v for k, v in new.items() if k != art.HASH} | {"sha256": "0" * 32}
    assert art.same_bytes(new, art.tensor_fingerprint(t.clone()))
    assert art.same_bytes(legacy, dict(legacy))  # an older capture against an older one
    assert not art.same_bytes(new, legacy)  # two hash kinds never vouch for each other
    hashless = {k: v for k, v in new.items() if k != art.HASH}
    assert not art.same_bytes(hashless, dict(hashless))
    assert not art.same_bytes(new, art.tensor_fingerprint(t.double()))
    assert not art.same_bytes(new, art.tensor_fingerprint(t.view(1, 5)))
    # a pair whose fingerprints cannot vouch is read, and its difference found
    a, b = t.clone(), t.clone()
    b[1] += 1.0
    setattr(a, art.FINGERPRINT, hashless)
    setattr(b, art.FINGERPRINT, dict(hashless))
    assert not compare_tensors(a, b, 1e-5, 1e-5)["ok"]


def test_different_bytes_are_read_and_compared():
    t = torch.randn(10)
    other = t.clone()
    other[4] += 1.0
    found = compare_tensors(_with_fingerprint(t), _with_fingerprint(other), 1e-5, 1e-5)
    assert not found["ok"] and found["max_abs"] == pytest.approx(1.0)


def test_an_index_that_does_not_describe_the_file_is_not_used(tmp_path):
    writer = art.StepWriter(tmp_path, 0)
    writer.tensors(art.GRADS, {"a": torch.ones(3), "b": torch.zeros(2, 2)})
    step = writer.commit()
    index = art.load_json(step / art.INDEX)
    assert [e["shape"] for e in index["files"][art.GRADS]] == [[3], [2, 2]]
    loaded = StepSource(step).tensors(art.GRADS)
    assert getattr(loaded["b"], art.FINGERPRINT)[art.HASH] == index["files"][art.GRADS][1][art.HASH]
    index["files"][art.GRADS].pop()
    art.save_json(step / art.INDEX, index)
    loaded = StepSource(step).tensors(art.GRADS)
    assert not hasattr(loaded["a"], art.FINGERPRINT)


def test_a_file_written_again_after_its_index_is_read_in_full(tmp_path):
    writer = art.StepWriter(tmp_path, 0)
    writer.tensors(art.GRADS, {"a": torch.ones(3)})
    step = writer.commit()
    art.save_tensors(step / art.GRADS, {"a": torch.full((3,), 2.0)})  # same size, new values
    loaded = StepSource(step).tensors(art.GRADS)
    assert not hasattr(loaded["a"], art.FINGERPRINT)


@pytest.mark.slow
def test_a_real_compare_is_the_same_with_and_without_the_index(tmp_path, data, monkeypatch):
    """A plain and a faulty nest capture of two steps: identical tensors (the batch, the initial
    state, the first layers) and differing ones (everything after the fault) side by side."""
    fault = "fault=encoder.layers.1.feed_forward2.linear1*1.001"
    ref = nest_capture(tmp_path / "ref", data, steps="0,1").parent
    cand = nest_capture(tmp_path / "cand", data, (), fault, steps="0,1").parent
    tols = load_tolerances(atol=1e-5, rtol=1e-5)
    passes = []
    counted = metrics._float_pass
    monkeypatch.setattr(metrics, "_float_pass", lambda *a: passes.append(1) or counted(*a))
    for step in (0, 1):
        a, b = art.step_dir(ref, step), art.step_dir(cand, step)
        passes.clear()
        indexed = compare_steps(a, b, tols)
        read_with_index = len(passes)
        passes.clear()
        read = compare_steps(a, b, tols, use_index=False)
        assert indexed == read
        assert indexed["verdict"] == "fail"
        if step == 0:  # before the fault every value is the same: those are not read
            assert read_with_index < 0.6 * len(passes), (read_with_index, len(passes))
        passes.clear()
        assert compare_steps(a, a, tols)["verdict"] == "pass"
        assert passes == []  # a capture against itself: no pair is read


def test_a_value_that_occurs_again_is_stored_once(tmp_path):
    big = torch.randn(256, 256)
    writer = art.StepWriter(tmp_path, 0)
    writer.tensors(
        art.LAYERS, [{"outputs": big}, {"inputs": [big.clone()]}, {"x": big + 1}], once=True
    )
    writer.tensors(
        art.TRAINING_STATE, {"a": {"step": torch.tensor(4.0)}, "b": {"step": torch.tensor(4.0)}}
    )
    step = writer.commit()
    calls = art.load_tensors(step / art.LAYERS)
    assert calls[0]["outputs"] is calls[1]["inputs"][0]
    assert torch.equal(calls[2]["x"], big + 1)
    assert (step / art.LAYERS).stat().st_size < 2.2 * big.numel() * 4  # two values, not three
    state = art.load_tensors(step / art.TRAINING_STATE)  # an optimizer steps these in place:
    assert state["a"]["step"] is not state["b"]["step"]  # never aliased


def test_the_recorder_copies_an_output_that_is_the_next_calls_input_once():
    from nestalign.capture import LayerRecorder

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    recorder = LayerRecorder(model, grads=False)
    recorder.start()
    model(torch.randn(2, 4))
    recorder.stop()
    by_name = {c["name"]: c for c in recorder.calls}
    assert by_name["0"]["outputs"] is by_name["1"]["inputs"][0]


@pytest.mark.parametrize("name", ["float32", "nan and inf", "float16", "transposed view"])
def test_a_differing_pair_with_fingerprints_gives_what_reading_it_gives(name):
    """The scale (the small-value floor of max_rel) comes from the fingerprints then."""
    t = _cases()[name]
    other = t * 1.001 + 1e-3
    read = compare_tensors(t, other, 1e-5, 1e-5)
    indexed = compare_tensors(_with_fingerprint(t), _with_fingerprint(other), 1e-5, 1e-5)
    assert indexed == read


def test_the_divergence_walk_traces_a_hashless_fingerprint_by_its_values():
    from nestalign.compare.divergence import fingerprint

    a, b = torch.zeros(4), torch.ones(4)
    for t in (a, b):
        setattr(t, art.FINGERPRINT, {"dtype": "float32", "shape": [4]})  # no hash of either kind
    assert fingerprint(a) != fingerprint(b)
