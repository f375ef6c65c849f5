"""Summary table (deterministic, drift, errors) and the HTML report in headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nestalign import artifacts as art
from nestalign import report, report_rows
from nestalign.compare import compare_steps, load_tolerances, save_result
from nestalign.summary import load_or_error, load_result
from test_divergence_faults import build, capture

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
        result["candidate"] = "candidate"  # one pair: drift divides steps of the same pair only
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


class _Node:
    """An element of a dumped DOM, with its parent (to check what is visible)."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: _Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[_Node] = []
        self.text: list[str] = []

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def has(self, key: str, value: str) -> bool:
        """Whether attribute ``key`` is ``value`` or holds it as one of its words (classes)."""
        got = self.attrs.get(key)
        return got is not None and (got == value or value in got.split())

    def find(self, tag: str, **attrs: str) -> list[_Node]:
        """Descendants with this tag and these attributes (``class_`` for class, ``data_x`` for
        data-x)."""
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [
            n for n in self.walk() if n.tag == tag and all(n.has(k, v) for k, v in want.items())
        ]


class _Dom(HTMLParser):
    """The element tree of Chromium's --dump-dom output."""

    VOID = {"meta", "input", "br", "img", "hr", "link", "col", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.root = _Node("#root", {}, None)
        self.cur = self.root
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.text.append(data)


@pytest.fixture(scope="module")
def drill(tmp_path_factory) -> Path:
    """Real comparisons of captures laid out as the workflow lays them out (capture/FW/seed_S):
    42/0 a planted fault (eps), 42/1 identical, 43/0 identical, 44/0 a backward-only fault,
    45/0 the eps fault teacher-forced. The candidate's metadata says "eps"; its directory
    (the configured name) says nest_fault."""
    base = tmp_path_factory.mktemp("drill")
    cap, out = base / "capture", base / "compare"
    tols = load_tolerances(atol=1e-6, rtol=1e-5)
    ref = capture(cap / "nemo" / "seed_42", "")
    forced_run = cap / "nemo" / "seed_45"
    forced_run.mkdir(parents=True)
    art.save_tensors(forced_run / "initial.pt", art.to_plain(build("", 7).state_dict()))
    forced_ref = capture(forced_run, "")
    pairs = {
        (42, 0): (ref, capture(cap / "nest_fault" / "seed_42", "eps")),
        (42, 1): (ref, capture(cap / "nest_fault" / "seed_42b", "")),
        (43, 0): (ref, capture(cap / "nest_fault" / "seed_43", "")),
        (44, 0): (ref, capture(cap / "nest_fault" / "seed_44", "bad_backward")),
        (45, 0): (
            forced_ref,
            capture(cap / "nest_fault" / "seed_45", "eps", forced_by=forced_ref),
        ),
    }
    for (seed, step), (r, c) in pairs.items():
        result = compare_steps(r, c, tols)
        result["seed"], result["step"] = seed, step
        save_result(result, out / f"seed_{seed}" / f"step_{step}.pkl")
    return out


@pytest.fixture(scope="module")
def built(drill, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    cmd = [sys.executable, str(ROOT / "scripts/report.py"), str(drill)]
    subprocess.run(cmd + ["--out", str(out / "report.html")], check=True, capture_output=True)
    return out


def _dom(url: str, tmp: Path) -> _Dom:
    proc = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], tmp)
    assert proc.returncode == 0, proc.stderr
    dom = _Dom(proc.stdout)
    assert dom.root.find("body", data_ready="1"), "the report's script did not run"
    return dom


LAYOUT_PAGE = """<!doctype html><html><body><iframe id="f" width="1400" height="1000"
src="%s"></iframe><pre id="out"></pre><script>
document.getElementById('f').addEventListener('load', function () {
  const d = document.getElementById('f').contentDocument;
  const lines = Array.from(d.querySelectorAll('.line[data-cat]'))
    .filter(function (l) { return l.checkVisibility(); })
    .map(function (l) {
      return [l.closest('section').id, l.dataset.cat, l.dataset.name, l.classList.contains('ctx')];
    });
  document.getElementById('out').textContent = JSON.stringify({
    shown: lines, width: d.documentElement.scrollWidth, client: d.documentElement.clientWidth});
});
</script></body></html>"""


def _rendered(report_html: Path, query: str, tmp: Path) -> dict:
    """What Chromium lays out in a 1400 px wide frame: the lines it draws (section, category,
    name, whether a context line) and the page's scroll and client widths."""
    page = tmp / "layout.html"
    page.write_text(LAYOUT_PAGE % (report_html.as_uri() + query))
    args = ["--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom"]
    proc = _chromium([*args, page.as_uri()], tmp)
    assert proc.returncode == 0, proc.stderr
    out = _Dom(proc.stdout).root.find("pre", id="out")[0].all_text()
    data = json.loads(out)
    data["shown"] = {tuple(x[:3]): x[3] for x in data["shown"]}
    return data


def _section(dom: _Dom, anchor: str) -> _Node:
    found = dom.root.find("section", id=anchor)
    assert len(found) == 1, anchor
    return found[0]


def _line(section: _Node, name: str, cat: str) -> _Node:
    found = [
        n
        for n in section.find("div", data_name=name, data_cat=cat)
        if "line" in n.attrs["class"].split()
    ]
    assert len(found) == 1, (name, cat)
    return found[0]


def _cell(line: _Node, column: str) -> str:
    return line.find("span", class_=f"c-{column}")[0].all_text()


def _cx(section: _Node, key: str, cat: str = "layers") -> float:
    svg = section.find("svg")[0]  # the max rel chart
    return float(svg.find("circle", data_call=key, data_cat=cat)[0].attrs["cx"])


def test_report_links_sections_and_marks_the_culprit(built, tmp_path):
    text = (built / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing from the network
    dom = _dom((built / "report.html").as_uri() + "#seed_42_step_0", tmp_path)
    ids = {n.attrs["id"] for n in dom.root.find("section")}
    table = dom.root.find("table", id="summary")[0]
    links = [a.attrs["href"] for a in table.find("a")]
    assert len(links) == 5 and links[0] == "#seed_42_step_0"
    assert {h.removeprefix("#") for h in links} == ids  # every row reaches its section
    assert [n.all_text() for n in table.find("td", class_="pair")] == ["nemo vs nest_fault"] * 5

    sec = _section(dom, "seed_42_step_0")
    assert sec.find("b", class_="cand-label")[0].all_text() == "nest_fault"
    assert "eps" not in sec.find("p", class_="pair")[0].all_text().split()
    fwd = [n for n in sec.find("div", data_mark="1") if "first forward culprit" in _cell(n, "mark")]
    assert len(fwd) == 1 and fwd[0].attrs["data-name"] == "blocks.1.norm2#0"
    assert fwd[0].attrs["data-cat"] == "layers" and "marked" in fwd[0].attrs["class"].split()
    assert _cell(fwd[0], "class") == "LayerNorm" and _cell(fwd[0], "status") == "fail"
    assert "divergence: code" in _cell(fwd[0], "mark")
    back = _line(sec, "blocks.1.norm2#0", "layer_grads")
    assert "first backward culprit" in _cell(back, "mark")
    drawn = _rendered(built / "report.html", "#seed_42_step_0", tmp_path)
    assert drawn["width"] <= drawn["client"] <= 1400  # nothing overflows the page
    shown = drawn["shown"]
    for cat in ("layers", "layer_grads"):  # its parents are unfolded
        assert ("seed_42_step_0", cat, "blocks.1.norm2#0") in shown
    assert ("seed_42_step_0", "layers", "blocks.1#0") in shown
    assert ("seed_42_step_0", "layers", "blocks.0.attn.q#0") not in shown  # others stay folded
    assert ("seed_42_step_0", "grads", "blocks.1.norm2.weight") not in shown  # a folded group


def test_markers_sit_where_their_labels_say(built, drill, tmp_path):
    """The backward culprit's where names blocks.1.norm2#0 (eps) and blocks.1.ff.gate#0
    (backward-only fault), while its name is the call where the gradient first differs."""
    dom = _dom((built / "report.html").as_uri(), tmp_path)
    for anchor, pkl, key in (
        ("seed_42_step_0", "seed_42/step_0.pkl", "blocks.1.norm2#0"),
        ("seed_44_step_0", "seed_44/step_0.pkl", "blocks.1.ff.gate#0"),
    ):
        first = load_result(drill / pkl)["divergence"]["backward"]["first"]
        assert first["where"].startswith(key) and first["name"] != key
        sec = _section(dom, anchor)
        chart = sec.find("svg")[0]
        marker = chart.find("line", class_="backward")
        assert len(marker) == 1 and marker[0].attrs["data-call"] == key
        assert float(marker[0].attrs["x1"]) == _cx(sec, key, "layer_grads") == _cx(sec, key)
        assert float(marker[0].attrs["x1"]) != _cx(sec, first["name"], "layer_grads")
        tol = chart.find("line", class_="tol")
        assert [t.all_text() for t in tol] == ["rtol layers, layer_grads 1e-05"]
    sec = _section(dom, "seed_42_step_0")
    forward = sec.find("svg")[0].find("line", class_="forward")[0]
    assert float(forward.attrs["x1"]) == _cx(sec, "blocks.1.norm2#0")
    # each call at its completion: a parent after its children
    for parent, child in (
        ("<root>#0", "out#0"),
        ("blocks.1#0", "blocks.1.norm2#0"),
        ("blocks.1#0", "blocks.1.ff.lin2#0"),
        ("blocks.1.ff#0", "blocks.1.ff.lin2#0"),
        ("blocks.2#0", "blocks.2.ff#0"),
    ):
        assert _cx(sec, parent) > _cx(sec, child), (parent, child)
    assert _cx(sec, "blocks.1.norm2#0") < _cx(sec, "blocks.2.norm1#0")
    forced = _section(dom, "seed_45_step_0")
    assert "Teacher-forced" in forced.all_text()
    assert _cell(_line(forced, "blocks.1.norm2#0", "layers"), "forced") == "own error"


def test_filters_failing_only_and_by_category(built, tmp_path):
    query = "?failing=1&category=layer_grads#seed_42_step_0"
    shown = _rendered(built / "report.html", query, tmp_path)["shown"]
    sec = _section(_dom((built / "report.html").as_uri() + query, tmp_path), "seed_42_step_0")
    lines = {
        ("seed_42_step_0", n.attrs["data-cat"], n.attrs["data-name"]): n
        for n in sec.find("div", class_="line")
        if "data-cat" in n.attrs
    }
    mine = {k: ctx for k, ctx in shown.items() if k[0] == "seed_42_step_0"}
    assert len(mine) > 10
    for key, ctx in mine.items():
        assert ctx or key[1] == "layer_grads", key
        assert ctx or lines[key].attrs["data-fail"] == "1" or lines[key].attrs["data-mark"] == "1"
    assert ("seed_42_step_0", "layer_grads", "blocks.1.norm2#0") in mine
    assert ("seed_42_step_0", "layers", "blocks.1.norm2#0") not in mine
    assert ("seed_42_step_0", "layer_grads", "sub.conv1#0") in mine  # failing, its parent opened
    options = [o.attrs["value"] for o in sec.find("option")]
    cats = ["structure", "batch", "forward", "loss", "grads", "weights", "layers", "layer_grads"]
    assert options == ["", *cats]
    passing = _rendered(built / "report.html", "?failing=1", tmp_path)["shown"]
    assert not [k for k in passing if k[0] in ("seed_42_step_1", "seed_43_step_0")]
    assert ("seed_44_step_0", "layer_grads", "blocks.1.ff.act#0") in passing


def test_rows_tsv_per_step(built, drill):
    files = sorted(p.name for p in (built / "report" / "rows").iterdir())
    assert files == [
        f"seed_{s}_step_{t}.tsv" for s, t in ((42, 0), (42, 1), (43, 0), (44, 0), (45, 0))
    ]
    with open(built / "report" / "rows" / "seed_42_step_0.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert tuple(rows[0]) == report_rows.COLUMNS
    result = load_result(drill / "seed_42" / "step_0.pkl")
    cats = result["categories"]
    assert len(rows) == sum(len(c["rows"]) for c in cats.values())
    by_key = {(r["category"], r["name"]): r for r in rows}
    culprit = by_key[("layers", "blocks.1.norm2#0")]
    assert culprit["mark"] == "first forward culprit; divergence: code"
    assert culprit["class"] == "LayerNorm" and culprit["parent"] == "blocks.1#0"
    assert culprit["status"] == "fail" and culprit["walk"] == "culprit"
    for r in rows:
        if r["category"] == "layers" and r["parent"] != "-":
            assert int(by_key[("layers", r["parent"])]["order"]) > int(r["order"]), r["name"]
    assert by_key[("grads", "blocks.1.norm2.weight")]["status"] == "fail"


def test_labels_and_pairs_keep_drift_apart(drill):
    """Two candidates in one report: rows and sections are told apart, and drift only compares
    steps of the same (reference, candidate) pair."""
    passing = load_result(drill / "seed_43" / "step_0.pkl")
    failing = load_result(drill / "seed_42" / "step_0.pkl")
    failing["seed"], failing["step"] = 43, 1
    failing["cand_dir"] = failing["cand_dir"].replace("/nest_fault/", "/nest/")
    items = report.entries([passing, failing])
    assert [(e.pair, e.row["step"]) for e in items] == [
        (("nemo", "nest_fault"), 0),
        (("nemo", "nest"), 1),
    ]
    assert [e.anchor for e in items] == [
        "seed_43_step_0_nemo_vs_nest_fault",
        "seed_43_step_1_nemo_vs_nest",
    ]
    assert items[1].row["drift_grads"] is None  # no earlier step of nemo vs nest
    unreadable = load_or_error(drill / "seed_43" / "nothing.pkl")
    assert [e.pair for e in report.entries([passing, unreadable])] == [("nemo", "nest_fault")] * 2
    twice = report.entries([passing, passing])
    assert [e.anchor for e in twice] == ["seed_43_step_0", "seed_43_step_0_2"]
    given = report.build([passing], reference="NeMo", candidate="port")
    assert '<b class="cand-label">port</b>' in given.html and ">NeMo vs port</td>" in given.html


def test_screenshot_reads(built, tmp_path):
    shot = tmp_path / "shot.png"
    run = _chromium(
        [f"--screenshot={shot}", "--window-size=1400,1000", (built / "report.html").as_uri()],
        tmp_path,
    )
    assert run.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG")
    assert shot.stat().st_size > 20_000  # a blank page is a few kB
