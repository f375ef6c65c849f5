"""Step comparison: matching by name, unmatched items, damaged artifacts, name maps, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from nestalign import artifacts as art
from nestalign.callback import CaptureCallback
from nestalign.compare import CATEGORIES, ToleranceError, compare_steps, load_tolerances
from nestalign.namemap import NameMap
from nestalign.summary import load_result
from nestalign.summary import rows as summary_rows
from test_divergence_faults import build, capture

ROOT = Path(__file__).resolve().parents[1]
TOLS = load_tolerances(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pair")
    return capture(base / "ref", ""), capture(base / "cand", "")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(step: Path, name: str, fn) -> None:
    art.save_tensors(step / name, fn(torch.load(step / name, weights_only=True)))


def test_identical_steps_pass_with_every_category(pair):
    result = compare_steps(*pair, TOLS)
    assert result["verdict"] == "pass" and not result["errors"]
    # no initial_weights.pt, no training_state.pt (a capture without Lightning)
    assert set(result["categories"]) == set(CATEGORIES) - {"init", "optimizer", "rng"}
    assert result["notes"] == [
        {"category": "init", "name": "initial state", "reason": "no initial state captured"}
    ]
    assert (result["reference"], result["seed"], result["step"]) == ("reference", 7, 0)
    assert result["losses"]["reference"] == result["losses"]["candidate"]
    layers = result["categories"]["layers"]
    assert layers["matched"] == layers["total"] > 40
    assert result["categories"]["structure"]["order_same"]


def test_extra_and_missing_tensors_are_listed(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")

    def change(grads):
        grads["extra.weight"] = torch.ones(2)
        del grads["out.bias"]
        return grads

    _edit(cand, art.GRADS, change)
    result = compare_steps(pair[0], cand, TOLS)
    grads = result["categories"]["grads"]
    assert result["verdict"] == "fail"
    assert grads["only_ref"] == ["out.bias"] and grads["only_cand"] == ["extra.weight"]
    assert grads["total"] == grads["matched"] + 2


def test_calls_match_by_name_and_index_not_position(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")
    _edit(cand, art.LAYERS, lambda calls: calls[::-1])
    assert compare_steps(pair[0], cand, TOLS)["verdict"] == "pass"


def test_extra_call_and_shape_mismatch(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")

    def change(calls):
        calls.append({**calls[-1], "name": "probe", "call": 0})
        last = next(c for c in calls if c["name"] == "out")  # its output is the model's output
        last["outputs"] = torch.zeros(3)
        return calls

    _edit(cand, art.LAYERS, change)
    result = compare_steps(pair[0], cand, TOLS)
    layers = result["categories"]["layers"]
    # a call on one side only that changes nothing downstream is a note, not a failure
    assert [n["name"] for n in layers["notes"]] == ["probe#0"] and layers["only_cand"] == []
    bad = next(r for r in layers["rows"] if r["name"] == "out#0")
    assert bad["status"] == "fail" and bad["reason"]
    assert result["divergence"]["forward"]["first"]["name"] == "out#0"


@pytest.mark.parametrize(
    "damage",
    ["missing", "truncated", "not_torch", "bad_json"],
)
def test_damaged_artifacts_are_errors_not_tracebacks(pair, tmp_path, damage):
    cand = _copy(pair[1], tmp_path / "cand")
    target = {"bad_json": art.METADATA}.get(damage, art.LAYERS)
    path = cand / target
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "not_torch":
        path.write_text("hello")
    else:
        path.write_text("{not json")
    result = compare_steps(pair[0], cand, TOLS)
    assert result["verdict"] == "error"
    assert any(target in e["error"] for e in result["errors"])
    assert result["categories"]["grads"]["matched"] > 0  # the other categories still ran


def test_missing_step_directory(pair, tmp_path):
    result = compare_steps(pair[0], tmp_path / "nope", TOLS)
    assert result["verdict"] == "error" and "nope" in result["errors"][0]["error"]


def _rename(step: Path) -> None:
    """The candidate calls blocks 'layers' (as a port might)."""

    def name(n):
        return None if n is None else n.replace("blocks.", "layers.", 1)

    for f in (art.GRADS, art.WEIGHTS):
        _edit(step, f, lambda d: {name(k): v for k, v in d.items()})

    def calls(cs):
        for c in cs:
            c["name"], c["parent"] = name(c["name"]), name(c["parent"])
        return cs

    _edit(step, art.LAYERS, calls)
    structure = json.loads((step / art.STRUCTURE).read_text())
    for e in structure["entries"]:
        e["name"] = name(e["name"])
    (step / art.STRUCTURE).write_text(json.dumps(structure))


def test_renamed_modules_without_and_with_a_name_map(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")
    _rename(cand)
    result = compare_steps(pair[0], cand, TOLS)
    assert result["verdict"] == "fail"
    grads = result["categories"]["grads"]
    assert "blocks.0.attn.q.weight" in grads["only_ref"]
    assert "layers.0.attn.q.weight" in grads["only_cand"]
    assert "layers.0#0" in [n["name"] for n in result["categories"]["layers"]["notes"]]
    nmap = NameMap(regex=[(r"layers\.(\d+)", r"blocks.\1")])
    result = compare_steps(pair[0], cand, TOLS, nmap)
    assert result["verdict"] == "pass", result["errors"]
    row = next(r for r in result["categories"]["grads"]["rows"] if r["name"].startswith("blocks"))
    assert row["cand_name"].startswith("layers.")


def test_ignored_names_are_listed_apart(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")
    _edit(cand, art.GRADS, lambda g: {**g, "probe.weight": torch.ones(1)})
    result = compare_steps(pair[0], cand, TOLS, NameMap(ignore=[r"probe\..*"]))
    assert result["verdict"] == "pass"
    assert result["categories"]["grads"]["ignored"] == ["probe.weight"]


def test_structure_differences(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")
    structure = json.loads((cand / art.STRUCTURE).read_text())
    structure["entries"][0]["shape"] = [1]
    structure["entries"][1], structure["entries"][2] = (
        structure["entries"][2],
        structure["entries"][1],
    )
    (cand / art.STRUCTURE).write_text(json.dumps(structure))
    s = compare_steps(pair[0], cand, TOLS)["categories"]["structure"]
    assert s["failed"] == 1 and "shape" in s["rows"][0]["reason"]
    assert not s["order_same"] and s["first_order_difference"]["index"] == 1


def test_tolerances_per_category(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")
    _edit(cand, art.LOSS, lambda t: t * (1 + 1e-4))
    assert compare_steps(pair[0], cand, TOLS)["categories"]["loss"]["failed"] == 1
    spec = tmp_path / "tol.yaml"
    spec.write_text("atol: 1.0e-6\nrtol: 1.0e-5\ncategories:\n  loss: {atol: 0, rtol: 1.0e-3}\n")
    tols = load_tolerances(spec)
    assert tols["categories"]["loss"] == {"atol": 0.0, "rtol": 1e-3}
    assert compare_steps(pair[0], cand, tols)["verdict"] == "pass"
    spec.write_text("categories:\n  losss: {atol: 1}\n")
    with pytest.raises(ToleranceError, match="losss"):
        load_tolerances(spec)


def test_cli_writes_a_plain_pickle(pair, tmp_path):
    out = tmp_path / "seed_7" / "step_0.pkl"
    cmd = [sys.executable, str(ROOT / "scripts/compare.py"), "--ref", str(pair[0])]
    cmd += ["--cand", str(pair[1]), "--atol", "1e-6", "--rtol", "1e-5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "PASS" in proc.stdout
    result = load_result(out)  # loads builtins only: no class is named in the pickle
    assert result["verdict"] == "pass" and result["tolerances"]["atol"] == 1e-6
    bad = subprocess.run(
        [*cmd[:-1], str(out), "--name-map", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "x.yaml" in bad.stderr


def test_scripts_help():
    for script in ("compare.py", "summary.py", "report.py", "compare_nemo_nest_outputs.py"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), "--help"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0 and "usage" in proc.stdout


def test_unexpected_content_is_an_error_naming_the_file(pair, tmp_path):
    cand = _copy(pair[1], tmp_path / "cand")
    art.save_tensors(cand / art.LAYERS, [{"outputs": torch.ones(1)}])
    structure = json.loads((cand / art.STRUCTURE).read_text())
    structure["entries"] = [3]
    (cand / art.STRUCTURE).write_text(json.dumps(structure))
    result = compare_steps(pair[0], cand, TOLS)
    assert result["verdict"] == "error"
    errors = {e["category"]: e["error"] for e in result["errors"]}
    assert art.LAYERS in errors["layers"] and art.STRUCTURE in errors["structure"]


class LitEncoder(pl.LightningModule):
    """The planted-fault model trained by Lightning, captured by CaptureCallback."""

    def __init__(self, fault: str):
        super().__init__()
        self.model = build(fault, seed=5)

    def forward(self, feats, lengths):
        return self.model(feats, lengths)

    def training_step(self, batch, batch_idx):
        logits, mask = self(batch["feats"], batch["lengths"])
        return torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        data = [
            {
                "feats": torch.randn(24, 8, generator=g),
                "lengths": torch.tensor(24 - 9 * (i % 2)),
                "targets": torch.randint(0, 11, (12,), generator=g),
            }
            for i in range(6)
        ]
        return torch.utils.data.DataLoader(data, batch_size=2)


def lightning_capture(run_dir: Path, fault: str) -> Path:
    torch.set_num_threads(1)
    torch.manual_seed(11)
    cb = CaptureCallback(str(run_dir), [0, 1, 2], metadata={"framework": fault or "ref", "seed": 5})
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(LitEncoder(fault))
    return run_dir


def test_lightning_captures_over_steps(tmp_path):
    ref = lightning_capture(tmp_path / "ref", "")
    same = lightning_capture(tmp_path / "same", "")
    eps = lightning_capture(tmp_path / "eps", "eps")
    for step in (0, 1, 2):
        result = compare_steps(ref / f"step_{step}", same / f"step_{step}", TOLS)
        assert result["verdict"] == "pass" and result["step"] == step
        assert result["categories"]["layer_grads"]["total"] > 40
    results = [compare_steps(ref / f"step_{s}", eps / f"step_{s}", TOLS) for s in (0, 1, 2)]
    assert all(r["verdict"] == "fail" for r in results)
    assert results[0]["divergence"]["forward"]["first"]["module"] == "model.blocks.1.norm2"
    # from step 1 on the weights differ: the first culprit is a call whose weights, as left by
    # step 0's optimizer step, already differ
    first = results[1]["divergence"]["forward"]["first"]
    assert first["kind"] == "culprit"
    step0 = results[0]["categories"]["weights"]["rows"]
    differs = [r["name"] for r in step0 if r["status"] in ("fail", "noise")]
    assert any(name.startswith(first["module"] + ".") for name in differs)
    # conv2's bias was updated from a noise-level gradient: conv2's output differs by a constant
    # per channel, which the BatchNorm after it removes
    classes = {c["name"]: c["class"] for c in results[1]["divergence"]["forward"]["calls"]}
    assert classes["model.sub.conv2#0"] == "absorbed" and "model.sub.norm#0" not in classes
    table = summary_rows(results)
    weights = [row["weights_max_rel"] for row in table]
    assert weights[0] > 0 and table[1]["drift_weights"] == pytest.approx(weights[1] / weights[0])
