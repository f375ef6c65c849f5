"""Name map tensor transforms: split a fused tensor, transpose, reshape; both directions."""

from __future__ import annotations

import pytest
import torch

from nestalign.compare import compare_steps, load_tolerances
from nestalign.namemap import NameMap, NameMapError
from test_verdicts import make_step, parts

D = 4
MAP = """
regex:
  - ['proj\\.w', 'out.weight']
transforms:
  - match: 'att\\.qkv\\.(weight|bias)'
    split: {dim: 0, into: ['att.q.\\1', 'att.k.\\1', 'att.v.\\1']}
  - match: 'proj\\.w'
    transpose: [1, 0]
  - match: 'pos'
    reshape: [1, 2, 4]
"""


@pytest.fixture()
def nmap(tmp_path) -> NameMap:
    spec = tmp_path / "map.yaml"
    spec.write_text(MAP)
    return NameMap.load(spec)


def _fused() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "att.qkv.weight": torch.randn(3 * D, D, generator=g),
        "att.qkv.bias": torch.randn(3 * D, generator=g),
        "proj.w": torch.randn(D, 2, generator=g),
        "pos": torch.randn(2, 4, generator=g),
        "norm.weight": torch.randn(D, generator=g),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_map_state_splits_transposes_reshapes_and_renames(nmap):
    cand = _fused()
    ref, origin = nmap.map_state(cand)
    assert list(ref) == [
        "att.q.weight",
        "att.k.weight",
        "att.v.weight",
        "att.q.bias",
        "att.k.bias",
        "att.v.bias",
        "out.weight",
        "pos",
        "norm.weight",
    ]
    assert torch.equal(ref["att.k.weight"], cand["att.qkv.weight"][D : 2 * D])
    assert ref["att.v.bias"].shape == (D,)
    assert torch.equal(ref["out.weight"], cand["proj.w"].t())
    assert ref["pos"].shape == (1, 2, 4) and ref["out.weight"].is_contiguous()
    assert origin["att.v.weight"] == "att.qkv.weight" and origin["out.weight"] == "proj.w"
    assert nmap.map_shape("att.qkv.weight", [3 * D, D]) == [
        ("att.q.weight", [D, D]),
        ("att.k.weight", [D, D]),
        ("att.v.weight", [D, D]),
    ]
    assert nmap.map_shape("proj.w", [D, 2]) == [("out.weight", [2, D])]
    assert nmap.map_shape("norm.weight", [D]) == [("norm.weight", [D])]


def test_unmap_state_gives_back_the_original_bytes(nmap):
    cand = _fused()
    ref, _ = nmap.map_state(cand)
    back = nmap.unmap_state(ref, {n: list(t.shape) for n, t in cand.items()})
    assert list(back) == list(cand)
    for name, t in cand.items():
        assert back[name].shape == t.shape and torch.equal(_bits(back[name]), _bits(t)), name


def test_unmap_state_is_strict(nmap):
    cand = _fused()
    ref, _ = nmap.map_state(cand)
    shapes = {n: list(t.shape) for n, t in cand.items()}
    del ref["att.k.weight"], ref["norm.weight"]
    with pytest.raises(NameMapError) as info:
        nmap.unmap_state(ref, shapes)
    msg = str(info.value)
    assert "reference names missing: att.k.weight (for att.qkv.weight), norm.weight" in msg
    ref, _ = nmap.map_state(cand)
    ref["out.weight"] = torch.zeros(D, 2)  # not transposed
    with pytest.raises(NameMapError, match=r"out.weight has shape \[4, 2\], \[2, 4\] expected"):
        nmap.unmap_state(ref, shapes)
    with pytest.raises(NameMapError, match="cannot be split in 3 equal parts"):
        nmap.unmap_state(ref, {"att.qkv.weight": [10, D]})


def test_to_dict_lists_the_transforms(nmap):
    assert nmap.to_dict()["transforms"][0] == {
        "match": r"att\.qkv\.(weight|bias)",
        "split": {"dim": 0, "into": [r"att.q.\1", r"att.k.\1", r"att.v.\1"]},
    }
    assert nmap.to_dict()["transforms"][1] == {"match": r"proj\.w", "transpose": [1, 0]}


@pytest.mark.parametrize(
    "rule, message",
    [
        ("- {split: {dim: 0, into: [a, b]}}", r"transforms\[0\]: expected \{match"),
        ("- {match: a, transpose: [1, 0], reshape: [2]}", "needs exactly one of"),
        ("- {match: a, flip: [0]}", r"unknown keys \['flip'\]"),
        ("- {match: a, split: {dim: 0, into: a}}", "split must be"),
        ("- {match: a, transpose: [0, 0]}", "transpose must be a permutation"),
        ("- {match: a, reshape: [-1, 2]}", "no -1"),
        ("- {match: '(', transpose: [1, 0]}", "bad regular expression"),
        ("{match: a}", "'transforms' must be a list"),
    ],
)
def test_bad_transforms_name_the_file_and_the_rule(tmp_path, rule, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text("transforms:\n  " + rule.replace("\n", "\n  ") + "\n")
    with pytest.raises(NameMapError, match=message) as info:
        NameMap.load(spec)
    assert "bad.yaml" in str(info.value)
    if rule.startswith("- {match: a,"):
        assert "transforms[0] (match 'a')" in str(info.value)


def _split_ref(c):
    """The reference has separate q/k/v projections and out.weight [2, D]."""
    g = torch.Generator().manual_seed(2)
    extra = {f"att.{p}.weight": torch.randn(D, D, generator=g) for p in "qkv"}
    extra["out.weight"] = torch.randn(2, D, generator=g)
    for key in ("init", "grads", "weights"):
        c[key].update({n: t + len(key) for n, t in extra.items()})
    c["structure"]["entries"] += [
        {"name": n, "kind": "parameter", "shape": list(t.shape), "dtype": "float32"}
        for n, t in extra.items()
    ]


def _fused_cand(c):
    """The candidate: one fused qkv tensor and the output weight stored transposed."""
    _split_ref(c)
    for key in ("init", "grads", "weights"):
        d = c[key]
        d["att.qkv.weight"] = torch.cat([d.pop(f"att.{p}.weight") for p in "qkv"])
        d["proj.w"] = d.pop("out.weight").t().contiguous()
    entries = [e for e in c["structure"]["entries"] if not e["name"].startswith(("att.", "out."))]
    entries += [
        {"name": "att.qkv.weight", "kind": "parameter", "shape": [3 * D, D], "dtype": "float32"},
        {"name": "proj.w", "kind": "parameter", "shape": [D, 2], "dtype": "float32"},
    ]
    c["structure"]["entries"] = entries


def test_a_fused_and_a_transposed_port_matches_through_the_map(tmp_path, nmap):
    ref, cand = parts(), parts()
    _split_ref(ref)
    _fused_cand(cand)
    ref, cand = make_step(tmp_path / "r", ref), make_step(tmp_path / "c", cand)
    tols = load_tolerances(atol=0, rtol=0)
    plain = compare_steps(ref, cand, tols)
    assert plain["verdict"] == "fail"
    assert plain["categories"]["init"]["only_cand"] == ["att.qkv.weight", "proj.w"]
    result = compare_steps(ref, cand, tols, nmap)
    assert result["verdict"] == "pass", result["errors"]
    for cat in ("structure", "init", "grads", "weights"):
        c = result["categories"][cat]
        assert c["matched"] == c["total"] == 8, (cat, c["rows"])
    rows = {r["name"]: r for r in result["categories"]["weights"]["rows"]}
    assert rows["att.k.weight"]["cand_name"] == "att.qkv.weight"
    assert rows["out.weight"]["cand_name"] == "proj.w"
