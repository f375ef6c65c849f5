"""The mutant ports of tests/mutants.py do what they claim, against the unpatched port (no NeMo).

Neutral mutants give bitwise-equal initial weights, forward outputs, loss and gradients (after
their name map); code mutants change the numbers exactly at the place they name (the first
difference in execution order of the recorded module calls), init mutants change only the
initial weights they name, fp-noise mutants only round differently. ``applied`` leaves nest_ssl
exactly as it found it, and the mutants combine.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys

import pytest
import torch

import mutants as M

FORWARD_CLASS = {  # what the recorded-call localiser reports for each expected class
    "glue": "glue",
    "order": "glue",
    "code": "code",
    "random algorithm": "code",
    "missing": "missing",
}
REQUIRED = {
    "conv_no_pad_mask",
    "attn_no_mask",
    "ff_scale_moved",
    "length_off_by_one",
    "extra_dropout",
    "skip_dropout",
    "dropout_rand_algorithm",
    "conv_before_attention",
    "init_skip_throwaway",
    "init_attention_before_conv",
    "pos_emb_expand",
    "fused_qkv",
    "transposed_weight",
    "transposed_weight_matmul",
    "attn_arg_names",
    "extra_none_args",
    "no_cache_args",
    "wrapped_pre_encode",
    "identity_module",
    "featurizer_no_grad",
    "quantizer_no_grad",
    "subsampling_bft_input",
    "conv_bdt_output",
}


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


@functools.cache
def _run(names: tuple[str, ...]) -> dict:
    """Initial state_dict (under reference names), the recorded step and the model."""
    model = M.build_model(list(names))
    raw = _clone(model.state_dict())
    state = M.to_reference(M.combined_name_map(names), raw)
    step = M.run_step(model, record=True)
    step["grads"] = M.to_reference(M.combined_name_map(names), step["grads"])
    return {"state": state, "state_raw": raw, "step": step, "model": model}


def reference() -> dict:
    return _run(())


def _calls(step: dict) -> dict[str, dict]:
    return {f"{c['name']}#{c['call']}": c for c in step["calls"]}


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not M.same(a[k], b[k])]


def _assert_fp_noise(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], keys: list[str]):
    """Each differing tensor is within 1e-5 of the reference (relative to the larger of its own
    size and a hundredth of the largest gradient: some are zero up to rounding)."""
    scale = max(v.abs().max().item() for v in ref.values())
    for k in keys:
        diff = (ref[k] - cand[k]).abs().max().item()
        assert diff <= 1e-5 * max(ref[k].abs().max().item(), 1e-2 * scale), (k, diff)


def _snapshot() -> dict:
    """Every attribute of every imported nest_ssl module and of the classes defined there."""
    snap = {}
    for name, module in sorted(sys.modules.items()):
        if name != "nest_ssl" and not name.startswith("nest_ssl."):
            continue
        snap[name] = dict(vars(module))
        for attr, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == name:
                snap[f"{name}.{attr}"] = dict(vars(value))
    return snap


def _same_snapshot(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(a[k][x] is b[k][x] for x in a[k]) for k in a
    )


# ---- the registry ------------------------------------------------------------------------------
def test_registry_covers_the_brief_and_is_well_formed():
    assert set(M.MUTANTS) >= REQUIRED
    classes = {"code", "glue", "missing", "order", "random algorithm", "init", "fp noise"}
    for name, m in M.MUTANTS.items():
        assert m.name == name and m.kind in ("code", "neutral")
        assert m.doc and "\n" not in m.doc
        if m.kind == "code":
            assert m.expected and m.expected_class in classes, name
        else:
            assert m.expected_class in (None, "layout"), name
            assert (m.expected is None) == (m.expected_class is None), name
        for key in m.name_map or {}:
            assert key in ("exact", "regex", "ignore", "transforms"), name


def test_unknown_mutant_is_refused_and_applied_does_not_nest():
    with pytest.raises(KeyError, match="nope"), M.applied(["nope"]):
        pass
    with M.applied(["attn_no_mask"]), pytest.raises(RuntimeError), M.applied(["skip_dropout"]):
        pass


def test_reference_step_is_deterministic_and_has_a_finite_loss():
    ref = reference()["step"]
    again = M.run_step(M.build_model([]), record=False)
    assert torch.isfinite(ref["loss"]) and M.same(ref["loss"], again["loss"])
    assert not _differing(ref["grads"], again["grads"])
    assert ref["outputs"]["encoded_len"].tolist() == [19, 15]  # 150 and 120 feature frames
    assert len(ref["calls"]) == 94


# ---- neutral mutants: the same numbers bit for bit -----------------------------------------------
def _claims(name: str, ref: dict, cand: dict) -> None:
    """The structural change each neutral mutant claims is really there."""
    r, c, model = _calls(ref["step"]), _calls(cand["step"]), cand["model"]
    if name == "attn_arg_names":
        assert c["encoder.layers.1.self_attn#0"]["input_names"][:3] == ["q", "k", "v"]
        assert r["encoder.layers.1.self_attn#0"]["input_names"][:3] == ["query", "key", "value"]
    elif name == "extra_none_args":
        assert c["encoder.layers.0.feed_forward2#0"]["input_names"] == ["x", "cache", "extra"]
    elif name == "no_cache_args":
        assert "cache" not in c["encoder.layers.0.self_attn#0"]["input_names"]
        assert "cache" not in c["encoder.layers.0.conv.depthwise_conv#0"]["input_names"]
        assert "cache_last_time" not in c["encoder.layers.1#0"]["input_names"]
        assert "cache_last_time" in r["encoder.layers.1#0"]["input_names"]
    elif name == "wrapped_pre_encode":
        assert "encoder.pre_encode.inner.conv.0.weight" in model.state_dict()
        assert c["encoder.pre_encode.inner#0"]["parent"] == "encoder.pre_encode"
    elif name == "identity_module":
        assert c["encoder.layers.0.post_identity#0"]["parent"] == "encoder.layers.0"
        assert "encoder.layers.1.post_identity#0" not in c
    elif name == "featurizer_no_grad":
        assert type(model.preprocessor).forward is not M.MelPreprocessor.forward
        for key in ("preprocessor#0", "preprocessor.featurizer#0"):  # invisible in a recording
            assert c[key]["grad_outputs"] == r[key]["grad_outputs"]
    elif name == "quantizer_no_grad":
        assert r["quantizer.proj#0"]["grad_outputs"] == [None]
        assert c["quantizer.proj#0"]["grad_outputs"] is None
    elif name == "subsampling_bft_input":
        x_ref, x_cand = (
            r["encoder.pre_encode#0"]["inputs"][0],
            c["encoder.pre_encode#0"]["inputs"][0],
        )
        assert x_cand.shape != x_ref.shape and torch.equal(x_cand.transpose(1, 2), x_ref)
        assert M.first_difference(ref["step"]["calls"], cand["step"]["calls"]) == (
            "glue",
            "glue in encoder before encoder.pre_encode#0",
        )
    elif name == "conv_bdt_output":
        for i in (0, 1):
            key = f"encoder.layers.{i}.conv#0"
            assert torch.equal(c[key]["outputs"].transpose(1, 2), r[key]["outputs"])
            assert torch.equal(c[key]["grad_outputs"][0].transpose(1, 2), r[key]["grad_outputs"][0])
    elif name == "transposed_weight":
        assert model.state_dict()["encoder.pre_encode.out.weight"].shape == (640, 64)
        assert type(model.encoder.pre_encode.out).__name__ == "TransposedLinear"
    else:
        raise AssertionError(f"no claim check for {name}")


@pytest.mark.parametrize("name", M.neutral_mutants())
def test_neutral_mutant_is_bitwise_neutral(name):
    ref, cand = reference(), _run((name,))
    assert list(cand["state"]) == list(ref["state"]) or name == "transposed_weight"
    assert not _differing(ref["state"], cand["state"])
    assert not _differing(ref["step"]["outputs"], cand["step"]["outputs"])
    assert M.same(ref["step"]["loss"], cand["step"]["loss"])
    assert not _differing(ref["step"]["grads"], cand["step"]["grads"])
    _claims(name, ref, cand)


def test_all_neutral_mutants_together_are_bitwise_neutral():
    names = tuple(M.neutral_mutants())
    ref, cand = reference(), _run(names)
    assert not _differing(ref["state"], cand["state"])
    assert not _differing(ref["step"]["outputs"], cand["step"]["outputs"])
    assert M.same(ref["step"]["loss"], cand["step"]["loss"])
    assert not _differing(ref["step"]["grads"], cand["step"]["grads"])
    calls = _calls(cand["step"])
    assert calls["encoder.pre_encode.inner#0"]["type"] == "ConvSubsampling"
    assert calls["encoder.layers.0.self_attn#0"]["input_names"] == [
        "q",
        "k",
        "v",
        "mask",
        "pos_emb",
    ]
    assert "encoder.layers.0.post_identity#0" in calls


# ---- code mutants: the numbers change at the named place -----------------------------------------
FORWARD = [n for n in M.code_mutants() if M.MUTANTS[n].expected_class in FORWARD_CLASS]


@pytest.mark.parametrize("name", FORWARD)
def test_code_mutant_first_differs_at_the_expected_place(name):
    m, ref, cand = M.MUTANTS[name], reference(), _run((name,))
    assert not _differing(ref["state"], cand["state"])  # same initial weights
    assert not M.same(ref["step"]["loss"], cand["step"]["loss"])
    found = M.first_difference(ref["step"]["calls"], cand["step"]["calls"])
    assert found == (FORWARD_CLASS[m.expected_class], m.expected)


def test_length_off_by_one_changes_only_the_lengths_of_the_subsampling():
    r, c = _calls(reference()["step"]), _calls(_run(("length_off_by_one",))["step"])
    (x_ref, len_ref), (x_cand, len_cand) = (
        r["encoder.pre_encode#0"]["outputs"],
        c["encoder.pre_encode#0"]["outputs"],
    )
    assert torch.equal(x_ref, x_cand)
    assert len_ref.tolist() == [19, 15] and len_cand.tolist() == [19, 16]


def test_order_mutant_runs_the_conv_block_on_the_attention_blocks_input():
    r, c = _calls(reference()["step"]), _calls(_run(("conv_before_attention",))["step"])
    layer = "encoder.layers.0"
    assert c[f"{layer}.norm_conv#0"]["start"] < c[f"{layer}.norm_self_att#0"]["start"]
    assert torch.equal(
        c[f"{layer}.norm_conv#0"]["inputs"][0], r[f"{layer}.norm_self_att#0"]["inputs"][0]
    )


def test_init_skip_throwaway_changes_every_random_initial_weight_and_nothing_else():
    m, ref, cand = M.MUTANTS["init_skip_throwaway"], reference(), _run(("init_skip_throwaway",))
    assert list(cand["state"]) == list(ref["state"])
    diff = _differing(ref["state"], cand["state"])
    assert diff[0].rpartition(".")[0] == m.expected
    assert {k.split(".")[0] for k in diff} == {"encoder", "quantizer", "mask_processor", "decoder"}
    # what is left equal is what no random number initialises: norms, biases set to zero ...
    random = set(diff) | {k for k in ref["state"] if "norm" in k or "pos_bias" in k}
    leftover = [k for k in ref["state"] if k not in random and k.startswith("encoder.layers")]
    assert not leftover
    assert M.first_difference(ref["step"]["calls"], cand["step"]["calls"]) == (
        "code",
        "quantizer.proj#0",
    )


def test_init_attention_before_conv_changes_only_layer_1_conv_and_attention_weights():
    name = "init_attention_before_conv"
    m, ref, cand = M.MUTANTS[name], reference(), _run((name,))
    assert list(cand["state"]) == list(ref["state"])
    diff = _differing(ref["state"], cand["state"])
    assert diff[0].rpartition(".")[0] == m.expected
    conv = ("pointwise_conv1", "depthwise_conv", "pointwise_conv2")
    attn = ("linear_q", "linear_k", "linear_v", "linear_out")
    expected = [f"encoder.layers.1.conv.{c}.{p}" for c in conv for p in ("weight", "bias")]
    expected += [f"encoder.layers.1.self_attn.{c}.{p}" for c in attn for p in ("weight", "bias")]
    assert diff == [*expected, "encoder.layers.1.self_attn.linear_pos.weight"]


def test_pos_emb_expand_is_fp_noise_in_the_linear_pos_gradients_only():
    m, ref, cand = M.MUTANTS["pos_emb_expand"], reference(), _run(("pos_emb_expand",))
    assert not _differing(ref["state"], cand["state"])
    assert not _differing(ref["step"]["outputs"], cand["step"]["outputs"])
    assert M.same(ref["step"]["loss"], cand["step"]["loss"])
    diff = _differing(ref["step"]["grads"], cand["step"]["grads"])
    assert diff == [f"encoder.layers.{i}.self_attn.linear_pos.weight" for i in (0, 1)]
    assert f"{m.expected}.weight" in diff
    _assert_fp_noise(ref["step"]["grads"], cand["step"]["grads"], diff)
    r, c = _calls(ref["step"]), _calls(cand["step"])
    key = "encoder.layers.0.self_attn.linear_pos#0"
    assert r[key]["outputs"].shape[0] == 1 and c[key]["outputs"].shape[0] == 2
    assert torch.equal(c[key]["outputs"], r[key]["outputs"].expand_as(c[key]["outputs"]))


def test_fused_qkv_maps_onto_the_reference_and_is_fp_noise_in_the_backward_only():
    m, ref, cand = M.MUTANTS["fused_qkv"], reference(), _run(("fused_qkv",))
    sd = cand["model"].state_dict()
    assert "encoder.layers.0.self_attn.linear_qkv.weight" in sd
    assert sd["encoder.layers.0.self_attn.linear_qkv.weight"].shape == (192, 64)
    assert not any(".linear_q." in k for k in sd)
    assert not _differing(ref["state"], cand["state"])  # the split rule gives NeMo's weights
    assert not _differing(ref["step"]["outputs"], cand["step"]["outputs"])
    assert M.same(ref["step"]["loss"], cand["step"]["loss"])
    diff = _differing(ref["step"]["grads"], cand["step"]["grads"])
    # layer 1's attention weight gradients are exact; the input gradient is one GEMM
    assert not [k for k in diff if k.startswith("encoder.layers.1.self_attn.")]
    assert f"{m.expected}.weight" in diff
    assert not [k for k in diff if k.startswith(("encoder.layers.1.feed_forward2", "decoder"))]
    _assert_fp_noise(ref["step"]["grads"], cand["step"]["grads"], diff)
    assert M.first_difference(ref["step"]["calls"], cand["step"]["calls"]) == (
        "missing",
        "encoder.layers.0.self_attn.linear_q#0",
    )
    first = M.first_grad_difference(ref["step"]["calls"], cand["step"]["calls"])
    assert first == f"{m.expected}#0"


def test_transposed_weight_matmul_is_fp_noise_from_the_transposed_linear_on():
    name = "transposed_weight_matmul"
    m, ref, cand = M.MUTANTS[name], reference(), _run((name,))
    assert not _differing(ref["state"], cand["state"])
    found = M.first_difference(ref["step"]["calls"], cand["step"]["calls"])
    assert found == ("code", m.expected)
    r, c = _calls(ref["step"]), _calls(cand["step"])
    out_ref, out_cand = r["encoder.pre_encode.out#0"]["outputs"], c[m.expected]["outputs"]
    assert (out_ref - out_cand).abs().max() <= 1e-6 * out_ref.abs().max()
    assert math.isclose(ref["step"]["loss"].item(), cand["step"]["loss"].item(), rel_tol=1e-5)


def test_all_code_mutants_apply_together():
    names = tuple(M.code_mutants())
    cand = _run(names)
    model, step = cand["model"], cand["step"]
    assert torch.isfinite(step["loss"]) and not M.same(step["loss"], reference()["step"]["loss"])
    calls = _calls(step)
    assert "encoder.layers.1.feed_forward1.dropout#0" not in calls
    assert "encoder.layers.0.self_attn.linear_qkv#0" in calls
    assert (
        calls["encoder.layers.0.norm_conv#0"]["start"]
        < calls["encoder.layers.0.norm_self_att#0"]["start"]
    )
    assert step["outputs"]["encoded_len"].tolist() == [19, 16]
    assert type(model.encoder.pre_encode.out).__name__ == "TransposedLinear"
    assert model._mutant_names == names


# ---- applied() restores the port ----------------------------------------------------------------
def test_applied_restores_nest_ssl_exactly():
    before_model = M.build_model([])
    before = _snapshot()
    everything = list(M.MUTANTS)
    with M.applied(everything):
        assert not _same_snapshot(before, _snapshot())
    assert _same_snapshot(before, _snapshot())
    with pytest.raises(ValueError, match="boom"), M.applied(everything):
        raise ValueError("boom")
    assert _same_snapshot(before, _snapshot())
    after_model = M.build_model([])
    for a, b in zip(before_model.modules(), after_model.modules(), strict=True):
        assert type(a) is type(b) and "_mutants" not in vars(b)
    assert not _differing(_clone(before_model.state_dict()), _clone(after_model.state_dict()))
    step_before, step_after = M.run_step(before_model), M.run_step(after_model)
    assert M.same(step_before["loss"], step_after["loss"])
    assert not _differing(step_before["grads"], step_after["grads"])


def test_a_model_built_inside_keeps_its_mutations_outside():
    model = M.build_model(["skip_dropout", "attn_arg_names"])
    assert type(model.encoder.layers[1].feed_forward1).__name__ == "FeedForward"
    assert "forward" in vars(type(model.encoder.layers[1].feed_forward1))
    params = inspect.signature(model.encoder.layers[0].self_attn.forward).parameters
    assert list(params)[:3] == ["q", "k", "v"]
    assert torch.isfinite(M.run_step(model)["loss"])


@pytest.mark.parametrize("name", [n for n, m in M.MUTANTS.items() if m.name_map])
def test_name_maps_read_the_same_with_the_projects_name_map(name):
    """Where nestalign.namemap has tensor transforms, it maps the mutant's state like
    ``to_reference`` does."""
    namemap = pytest.importorskip("nestalign.namemap")
    if not hasattr(namemap.NameMap, "map_state"):
        pytest.skip("nestalign.namemap has no tensor transforms here")
    nm = M.MUTANTS[name].name_map
    rules = {**nm, "regex": [tuple(r) for r in nm.get("regex", [])]}
    state = _clone(_run((name,))["model"].state_dict())
    mapped, _origin = namemap.NameMap(**rules).map_state(state)
    mine = M.to_reference(nm, state)
    assert set(mapped) == set(mine) == set(reference()["state"])
    assert not _differing(mine, {k: mapped[k] for k in mine})


def test_a_lightning_model_built_inside_gets_the_mutants():
    from nest_ssl.training import NestPretraining

    cfg = M.tiny_model_config()
    cfg.train_ds = cfg.validation_ds = None
    names = ["fused_qkv", "wrapped_pre_encode", "init_attention_before_conv"]
    with M.applied(names):
        torch.manual_seed(42)
        model = NestPretraining(cfg)
    plain = _run(tuple(names))["model"]
    assert type(model.encoder.pre_encode).__name__ == "SubsamplingWrapper"
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not _differing(_clone(model.state_dict()), _run(tuple(names))["state_raw"])
