"""The original tool's command line, on its own directory layout and on this project's."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nestalign.compare import seed_sections
from nestalign.summary import load_result
from test_divergence_faults import capture

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts/compare_nemo_nest_outputs.py")
SECTIONS = (
    "1. Model structure",
    "2. Forward output",
    "3. Loss",
    "4. Parameter gradients",
    "5. Layer outputs",
)


def write_original(run_dir: Path, dec_shift: float = 0.0, dec_rows: int = 4) -> Path:
    """A run dir as the original tool wrote it: pickles plus .pt files under step_0/."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen)
    x = torch.randn(4, 2, generator=gen)
    enc = x @ w.t() + b
    dec = enc.relu()[:dec_rows] + dec_shift
    step = run_dir / "step_0"
    step.mkdir(parents=True)
    params = {"enc.weight": w, "enc.bias": b}
    with open(run_dir / "model_structure.pkl", "wb") as fh:
        pickle.dump(
            {
                "parameters": {
                    n: {"shape": list(p.shape), "dtype": str(p.dtype)} for n, p in params.items()
                }
            },
            fh,
        )
    with open(run_dir / "metadata.pkl", "wb") as fh:
        pickle.dump({"seed": 42}, fh)
    torch.save({"audio": x}, step / "batch.pt")
    torch.save(dec, step / "forward_output.pt")
    torch.save(dec.sum(), step / "loss.pt")
    torch.save({n: torch.ones_like(p) for n, p in params.items()}, step / "parameter_gradients.pt")
    torch.save(params, step / "parameter_weights.pt")
    with open(step / "layer_outputs.pkl", "wb") as fh:
        layers = {
            "enc": {"forward_inputs": (x,), "forward_outputs": enc},
            "dec": {"forward_inputs": (enc,), "forward_outputs": dec},
            # a module returning (output, lengths), the lengths an integer tensor
            "pool": {"forward_inputs": (dec,), "forward_outputs": (dec, torch.tensor([4, 2]))},
        }
        pickle.dump(layers, fh)
    return run_dir


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


@pytest.fixture()
def original(tmp_path) -> tuple[Path, Path]:
    return write_original(tmp_path / "nemo"), write_original(tmp_path / "nest", dec_shift=0.5)


def test_original_pickles_need_allow_pickle(original):
    proc = run("--nemo_output_dir", str(original[0]), "--nest_output_dir", str(original[1]))
    assert proc.returncode == 2
    assert "--allow-pickle" in proc.stdout and "model_structure.pkl" in proc.stdout


def test_original_layout_five_sections(original, tmp_path):
    saved = tmp_path / "cmp.pkl"
    proc = run(
        "--nemo_output_dir", str(original[0]), "--nest_output_dir", str(original[1]),
        "--step", "0", "--atol", "1e-5", "--rtol", "1e-5",
        "--save_comparison", str(saved), "--allow-pickle",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert [out.index(s) for s in SECTIONS] == sorted(out.index(s) for s in SECTIONS)
    assert "unpickling" in proc.stderr
    structure = out[out.index(SECTIONS[0]) : out.index(SECTIONS[1])]
    assert "items: 2  matched: 2 (100.00%)" in structure
    grads = out[out.index(SECTIONS[3]) : out.index(SECTIONS[4])]
    assert "items: 2  matched: 2 (100.00%)" in grads
    layers = out[out.index(SECTIONS[4]) :]
    assert "items: 3  matched: 1 (33.33%)" in layers
    assert "Mismatch: dec#0" in layers and "first forward culprit: dec#0" in layers
    result = load_result(saved)
    assert result["verdict"] == "fail" and result["seed"] == 42


def test_a_layer_whose_shapes_differ_is_a_mismatch_not_a_crash(tmp_path):
    ref, cand = write_original(tmp_path / "nemo"), write_original(tmp_path / "nest", dec_rows=3)
    proc = run(
        "--nemo_output_dir", str(ref), "--nest_output_dir", str(cand), "--allow-pickle",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "TypeError" not in proc.stderr
    layers = proc.stdout[proc.stdout.index(SECTIONS[4]) :]
    assert "Mismatch: dec#0: " in layers
    assert "Mismatch: pool#0: " in layers  # its lengths still match
    assert "max abs 0.000e+00  max rel 0.000e+00  cosine 1.00000000" in layers
    assert "first forward culprit: dec#0" in layers
    forward = proc.stdout[proc.stdout.index(SECTIONS[1]) : proc.stdout.index(SECTIONS[2])]
    assert "Mismatch: forward: shape [4, 3] vs [3, 3]" in forward
    assert "FAIL" in proc.stdout


def test_rows_without_max_rel_or_cosine_print_a_dash():
    """A row with a max abs but no max rel or cosine used to crash the sections (TypeError)."""
    row = {"name": "dec#0", "status": "fail", "reason": "shape [4] vs [3]", "max_abs": 0.5}
    row.update(max_rel=None, cosine=None)
    cat = {"total": 1, "matched": 0, "only_ref": [], "only_cand": [], "noise": [], "rows": [row]}
    result = {
        "reference": "nemo",
        "candidate": "nest",
        "losses": {"reference": 1.0, "candidate": 1.0},
        "categories": {"layers": cat},
        "divergence": {"forward": {"first": None}, "backward": {"first": None}},
    }
    lines = seed_sections(result)
    assert "  Mismatch: dec#0: shape [4] vs [3]" in lines
    assert "    max abs 5.000e-01  max rel -  cosine -" in lines


def test_project_layout(tmp_path):
    ref = capture(tmp_path / "nemo", "").parent
    cand = capture(tmp_path / "nest", "eps").parent
    proc = run("--nemo_output_dir", str(ref), "--nest_output_dir", str(cand), "--step", "0")
    assert proc.returncode == 0, proc.stderr
    assert all(s in proc.stdout for s in SECTIONS)
    assert "first forward culprit: blocks.1.norm2#0" in proc.stdout
    assert "FAIL" in proc.stdout


def test_help_explains_allow_pickle():
    proc = run("--help")
    assert proc.returncode == 0
    assert "Unpickling runs" in " ".join(proc.stdout.split())
