"""Fan in per-step comparison pickles: one row per (seed, step), drift over steps, TSV and Markdown.

The output depends only on the pickles' content (no time, no paths), so identical inputs give
byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

from nestalign.compare import CATEGORIES, FORMAT
from nestalign.compare.verdict import failing_items

VERDICTS = {"pass": "PASS", "fail": "FAIL", "nonfinite": "NONFINITE", "close": "CLOSE"}
# anything else: ERROR. CLOSE only comes from fingerprints (nestalign.fingerprints).
FAILING_LISTED = 3

DRIFT_CATEGORIES = ("loss", "grads", "weights")


class SummaryError(ValueError):
    """A comparison pickle that cannot be read."""


class _PlainUnpickler(pickle.Unpickler):
    """Loads builtins only: a comparison pickle never names a class or a function."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain result")


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SummaryError(f"{path}: not a readable comparison pickle ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SummaryError(f"{path}: not a comparison result (format {FORMAT} expected)")
    return data


def collect(paths: list[str | os.PathLike]) -> list[str]:
    """Pickle files from files and directories (searched recursively), sorted. Below a given
    directory, a ``state`` folder (the state-isolated comparisons, read through ``--own``) is
    left out."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(str(p))
            continue
        out += [str(f) for f in p.rglob("*.pkl") if "state" not in f.relative_to(p).parts[:-1]]
    return sorted(set(out))


def _key(result: dict[str, Any]) -> tuple:
    seed, step = result.get("seed"), result.get("step")
    return (
        seed if isinstance(seed, int) else math.inf,
        str(seed),
        step if isinstance(step, int) else math.inf,
        str(step),
    )


def _worst_rel(result: dict[str, Any], cat: str) -> float | None:
    c = result["categories"].get(cat) or {}
    return (c.get("worst") or {}).get("max_rel")


def _own_key(result: dict[str, Any]) -> tuple:
    return (result.get("reference"), result.get("candidate"), *_key(result))


def rows(
    results: list[dict[str, Any]], own: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One summary row per result, sorted by (seed, step), with drift against the previous step
    of the same (reference, candidate) pair and seed. ``own``: the state-isolated comparisons
    of the same steps (each step started from the reference's state), shown as ``own_*``."""
    out = []
    previous: dict[Any, dict[str, Any]] = {}
    own_of = {_own_key(r): r for r in own or []}
    own_of.update({_key(r): r for r in own or [] if r.get("reference") is None})  # unreadable
    for r in sorted(results, key=_key):
        cats = r["categories"]
        row: dict[str, Any] = {
            "seed": r.get("seed"),
            "step": r.get("step"),
            "reference": r.get("reference"),
            "candidate": r.get("candidate"),
            "verdict": VERDICTS.get(r["verdict"], "ERROR"),
            "loss_ref": r["losses"].get("reference"),
            "loss_cand": r["losses"].get("candidate"),
        }
        for cat in CATEGORIES:
            c = cats.get(cat) or {}
            row[f"{cat}_matched"] = (
                None  # not compared (no initial state captured, or no comparison at all)
                if cat not in cats
                else "error"
                if c.get("error")
                else f"{c.get('matched', 0)}/{c.get('total', 0)}"
            )
            if cat != "structure":
                row[f"{cat}_max_rel"] = _worst_rel(r, cat)
                row[f"{cat}_max_abs"] = (c.get("worst") or {}).get("max_abs")
        row["noise"] = sum(len((cats.get(c) or {}).get("noise", [])) for c in CATEGORIES)
        for direction in ("forward", "backward"):
            first = r["divergence"][direction]["first"]
            row[f"first_{direction}"] = first["where"] if first else ""
        pair = (row["reference"], row["candidate"], row["seed"])
        prev = previous.get(pair)
        for cat in DRIFT_CATEGORIES:
            row[f"drift_{cat}"] = _growth(prev and prev[f"{cat}_max_rel"], row[f"{cat}_max_rel"])
        mine = own_of.get(_own_key(r)) or own_of.get(_key(r))
        row["own_verdict"] = VERDICTS.get(mine["verdict"], "ERROR") if mine else None
        for cat in DRIFT_CATEGORIES:
            row[f"own_{cat}_max_rel"] = _worst_rel(mine, cat) if mine else None
        row["own_failing"] = _failing(mine) if mine else None
        row["notes"] = len(r.get("notes") or [])
        row["failing"] = _failing(r)
        entries = r.get("divergences") or []
        row["divergences"] = "; ".join(
            f"{e['where']} ({e['class']})" for e in entries[:FAILING_LISTED]
        ) + (
            f"; ... and {len(entries) - FAILING_LISTED} more"
            if len(entries) > FAILING_LISTED
            else ""
        )
        row["evidence"] = r.get("evidence", "full")
        row["errors"] = [f"[{e['category']}] {e['error']}" for e in r.get("errors", [])]
        if row["evidence"] == "full":  # drift compares full comparisons only
            previous[pair] = row
        out.append(row)
    return out


def _failing(result: dict[str, Any]) -> str:
    """The first failing items as ``cat:name (reason)``, and how many more."""
    if result.get("evidence") == "fingerprint":
        failing = result["failing_fingerprints"]
        more = max(result.get("failed", 0), len(failing)) - FAILING_LISTED
        return "; ".join(failing[:FAILING_LISTED]) + (f"; ... and {more} more" if more > 0 else "")
    failing = failing_items(result) if result["categories"] else []
    listed = "; ".join(f"{c}:{n} ({why})" for c, n, why in failing[:FAILING_LISTED])
    more = len(failing) - FAILING_LISTED
    return listed + (f"; ... and {more} more" if more > 0 else "")


def _growth(before: float | None, now: float | None) -> float | None:
    """now / before: how much the worst relative error grew since the previous step."""
    if before is None or now is None:
        return None
    if before == 0:
        return 1.0 if now == 0 else math.inf
    return now / before


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value).replace("\t", " ").replace("\n", " ") or "-"


def tsv(table: list[dict[str, Any]]) -> str:
    if not table:
        return ""
    cols = [c for c in table[0] if c != "errors"] + ["errors"]
    lines = ["\t".join(cols)]
    for row in table:
        cells = [_fmt(row[c]) for c in cols[:-1]] + ["; ".join(row["errors"]) or "-"]
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


MD_COLUMNS = (
    ("seed", "seed"),
    ("step", "step"),
    ("verdict", "verdict"),
    ("evidence", "evidence"),
    ("notes", "notes"),
    ("loss_ref", "loss ref"),
    ("loss_cand", "loss cand"),
    ("forward_max_rel", "fwd rel"),
    ("grads_max_rel", "grads rel"),
    ("weights_max_rel", "weights rel"),
    ("layers_max_rel", "layers rel"),
    ("structure_matched", "structure"),
    ("grads_matched", "grads"),
    ("weights_matched", "weights"),
    ("layers_matched", "layers"),
    ("layer_grads_matched", "layer grads"),
    ("first_forward", "first culprit (forward)"),
    ("first_backward", "first culprit (backward)"),
    ("drift", "drift loss/grads/weights"),
    ("own_verdict", "own"),
    ("own", "own rel loss/grads/weights"),
    ("failing", "failing"),
)


def markdown(table: list[dict[str, Any]]) -> str:
    head = [title for _, title in MD_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = []
        for key, _ in MD_COLUMNS:
            value = md_cell(row, key)
            cells.append(value.replace("|", "\\|") if value else "-")
        lines.append("| " + " | ".join(cells) + " |")
    listed = [row for row in table if row.get("divergences")]
    if listed:
        lines += ["", "Divergences (in execution order):", ""]
        lines += [
            f"- seed {row['seed']} step {row['step']}: {row['divergences']}" for row in listed
        ]
    lines += growth(table)
    errors = [(row, e) for row in table for e in row["errors"]]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- seed {row['seed']} step {row['step']}: {e}" for row, e in errors]
    return "\n".join(lines) + "\n"


def md_cell(row: dict[str, Any], key: str) -> str:
    """A Markdown (and report) cell: ``drift`` and ``own`` join their three categories."""
    if key in ("drift", "own"):
        name = "drift_{}" if key == "drift" else "own_{}_max_rel"
        cells = [row[name.format(c)] for c in DRIFT_CATEGORIES]
        if key == "own" and all(c is None for c in cells):
            return "-"
        return "/".join(map(_fmt, cells))
    return _fmt(row[key])


def growth(table: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per (pair, seed) with several steps, each drift category's worst max abs
    at its first and last step and the growth per step between them (a long drift sweep's
    figure: config/sweeps/drift.yaml)."""
    runs: dict[tuple, list[dict[str, Any]]] = {}
    for row in table:
        if isinstance(row["step"], int) and row.get("evidence", "full") == "full":
            runs.setdefault((row["reference"], row["candidate"], row["seed"]), []).append(row)
    lines = []
    for (ref, cand, seed), steps in runs.items():
        if len(steps) < 2:
            continue
        first, last = steps[0], steps[-1]
        span = last["step"] - first["step"]
        parts = []
        for cat in DRIFT_CATEGORIES:
            a, b = first[f"{cat}_max_abs"], last[f"{cat}_max_abs"]
            known = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b))
            rate = (b - a) / span if known else None
            parts.append(f"{cat} {_fmt(a)} -> {_fmt(b)} ({_fmt(rate)} per step)")
        lines.append(
            f"- {ref} vs {cand} seed {seed}, steps {first['step']}-{last['step']}: "
            + "; ".join(parts)
        )
    return ["", "Growth of the worst max abs over the steps:", "", *lines] if lines else []


def add_own_option(parser: argparse.ArgumentParser) -> None:
    """``--own PKL`` (repeatable): the state-isolated comparisons, for scripts/summary.py and
    scripts/report.py."""
    parser.add_argument(
        "--own",
        action="append",
        default=[],
        metavar="PKL",
        help="a state-isolated comparison (isolation: {state: reference}) of one of the steps: "
        "its error shows as the step's own error (repeatable)",
    )


def add_fingerprints_option(parser: argparse.ArgumentParser) -> None:
    """``--fingerprints JSON`` (repeatable), for scripts/summary.py and scripts/report.py."""
    parser.add_argument(
        "--fingerprints",
        action="append",
        default=[],
        metavar="JSON",
        help="a seed's fingerprint compare (scripts/compare_fingerprints.py): a row per step "
        "that no comparison pickle covers (repeatable)",
    )


def with_fingerprints(results: list[dict[str, Any]], paths: list[str]) -> list[dict[str, Any]]:
    """``results`` and, for each step of the fingerprint compares in ``paths`` that none of
    them covers, that step's fingerprint verdict (evidence "fingerprint")."""
    from nestalign.fingerprints import FingerprintError, as_results, load_run

    covered = {_key(r) for r in results}
    out = list(results)
    for path in paths:
        try:
            steps = as_results(load_run(path), FORMAT)
        except FingerprintError as exc:
            raise SummaryError(str(exc)) from None
        out += [r for r in steps if _key(r) not in covered]
    return out


def load_or_error(path: str | os.PathLike) -> dict[str, Any]:
    """The result in ``path``, or an ERROR stub (seed and step from seed_S/step_N.pkl)."""
    try:
        return load_result(path)
    except SummaryError as exc:
        p = Path(path)
        seed = p.parent.name.removeprefix("seed_")
        step = p.stem.removeprefix("step_")
        return {
            "format": FORMAT,
            "seed": int(seed) if seed.isdigit() else seed,
            "step": int(step) if step.isdigit() else step,
            "reference": None,
            "candidate": None,
            "verdict": "error",
            "errors": [{"category": "pickle", "error": str(exc)}],
            "losses": {"reference": None, "candidate": None},
            "categories": {},
            "divergence": {"forward": {"first": None}, "backward": {"first": None}},
        }
