"""Summary table (deterministic, drift, errors) and the HTML report in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nestalign.compare import compare_steps, load_tolerances, save_result
from test_divergence_faults import capture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pickles(tmp_path_factory) -> Path:
    """seed 1: steps 0 (pass) and 1 (fault); seed 2: step 0 (pass); seed 3: a broken pickle."""
    base = tmp_path_factory.mktemp("cmp")
    ref = capture(base / "ref", "")
    same = capture(base / "same", "")
    eps = capture(base / "eps", "eps")
    tols = load_tolerances(atol=1e-6, rtol=1e-5)
    out = base / "compare"
    for seed, step, cand in ((1, 0, same), (1, 1, eps), (2, 0, same)):
        result = compare_steps(ref, cand, tols)
        result["seed"], result["step"] = seed, step
        if (seed, step) == (1, 0):  # a known worst error so that the drift is known: 0.25 / 1e-3
            result["categories"]["grads"]["worst"]["max_rel"] = 1e-3
        if (seed, step) == (1, 1):
            result["categories"]["grads"]["worst"]["max_rel"] = 0.25
        save_result(result, out / f"seed_{seed}" / f"step_{step}.pkl")
    (out / "seed_3").mkdir()
    (out / "seed_3" / "step_0.pkl").write_bytes(b"\x80\x04garbage")
    return out


def _summary(pickles: Path, out: Path, *inputs: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts/summary.py"), *(inputs or [str(pickles)])]
    cmd += ["--tsv", str(out / "summary.tsv"), "--md", str(out / "summary.md")]
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def test_summary_rows_verdicts_and_drift(pickles, tmp_path):
    proc = _summary(pickles, tmp_path)
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    rows = [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]
    assert [(r["seed"], r["step"], r["verdict"]) for r in rows] == [
        ("1", "0", "PASS"),
        ("1", "1", "FAIL"),
        ("2", "0", "PASS"),
        ("3", "0", "ERROR"),
    ]
    assert rows[1]["first_forward"] == "blocks.1.norm2#0 (LayerNorm)"
    assert rows[1]["first_backward"].startswith("blocks.1.norm2#0")
    assert float(rows[1]["drift_grads"]) == pytest.approx(250.0)
    assert rows[0]["drift_grads"] == "-" and rows[2]["drift_grads"] == "-"
    assert rows[0]["loss_ref"] == rows[0]["loss_cand"] != rows[1]["loss_cand"]
    assert rows[1]["grads_matched"].endswith("/56") and rows[0]["grads_matched"] == "56/56"
    assert "step_0.pkl" in rows[3]["errors"]
    md = (tmp_path / "summary.md").read_text()
    assert proc.stdout == md
    assert md.count("\n| ") == 4 and "| 1 | 1 | FAIL |" in md and "Errors:" in md


def test_summary_is_byte_identical(pickles, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(str(p) for p in pickles.rglob("*.pkl"))
    _summary(pickles, a)
    _summary(pickles, b, *files[::-1])
    for name in ("summary.tsv", "summary.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert not re.search(r"20\d\d-\d\d-\d\d", (a / name).read_text())


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is needed: apt-get install chromium")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(pickles, tmp_path):
    html_path = tmp_path / "report.html"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/report.py"), str(pickles), "--out", str(html_path)],
        check=True,
        capture_output=True,
    )
    text = html_path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing from the network
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 2 + 3  # losses, drift, one execution plot per readable step
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")

    dom = _chromium(["--dump-dom", html_path.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr
    table = re.search(r'<table id="summary">(.*?)</table>', dom.stdout, re.S)
    assert table is not None
    assert table.group(1).count("<tr>") == 1 + 4
    assert 'class="FAIL"' in table.group(1) and 'class="ERROR"' in table.group(1)
    assert dom.stdout.count("data:image/png;base64,") == len(images)
    assert "first forward culprit: blocks.1.norm2#0" in dom.stdout

    shot = tmp_path / "shot.png"
    run = _chromium(
        [f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()], tmp_path
    )
    assert run.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG")
    assert shot.stat().st_size > 20_000  # a blank page is a few kB
