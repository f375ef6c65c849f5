"""Where two runs start to differ: classify every failing module call, forward and backward.

Forward, over the reference's calls (in start order; ``start``/``end`` give the nesting):

- ``culprit``: every input matches, the output does not (the call's own code differs);
- ``absorbed``: like a culprit, but every call that consumed the differing output produced a
  matching one (a conv whose bias differs, followed by BatchNorm): no effect downstream;
- ``contains culprit``: like a culprit, but a call inside it is the culprit (or glue, or missing);
- ``victim``: an input differs because an earlier call's output (or the enclosing call's input)
  that it was computed from already differs;
- ``glue``: an input differs although the tensor it came from matched, or, when no single call
  produced it, although every earlier call matched: the parent's own code between its children
  changed it;
- ``missing``: the call has no counterpart in the candidate.

Where an input came from is found by value: a reference input is traced to the latest earlier
call whose reference output is the same tensor (shape, dtype, sum and sampled values).

Backward, over the calls' ``grad_outputs`` in reverse execution order. A call whose forward output
already differs is ``forward`` (its gradient differs for that reason). For a call whose forward
matched but whose gradient differs:

- ``victim`` if a call that consumed its output has a differing gradient and a matching forward;
- ``culprit`` at the place the difference entered: when a later call's forward differs, the first
  forward culprit (or glue, or missing call) after it or around it; otherwise the consumer whose
  own backward turned a matching gradient into a differing one;
- ``glue`` in the parent when nothing consumed the output and every later gradient matched.
"""

from __future__ import annotations

from typing import Any

import torch

from nestalign.align import call_inputs, leaves
from nestalign.artifacts import FINGERPRINT, digest

__all__ = ["analyse", "call_inputs", "empty", "fingerprint", "leaves"]

CULPRITS = ("culprit", "glue", "missing", "random algorithm")


def fingerprint(t: Any) -> tuple | None:
    """Identity of a tensor's value, cheap to compare: shape, dtype, sum, sampled elements."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return None
    known = digest(getattr(t, FINGERPRINT, None))
    if known is not None:  # the capture's hash: exact, and the tensor is not read
        return (tuple(t.shape), str(t.dtype), known)
    flat = t.reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, 16).long()
    total = flat.sum(dtype=torch.float64) if not t.is_complex() else flat.abs().sum()
    return (tuple(t.shape), str(t.dtype), float(total), tuple(flat[idx].tolist()))


def empty() -> dict[str, Any]:
    return {"forward": {"first": None, "calls": []}, "backward": {"first": None, "calls": []}}


class _Trace:
    """The reference calls with their nesting and lazily computed fingerprints."""

    def __init__(self, calls: list[dict[str, Any]]):
        self.calls = calls
        self.keys = [f"{c['name']}#{c['call']}" for c in calls]
        n = len(calls)
        end = [c.get("end", i) if c.get("end", -1) >= 0 else i for i, c in enumerate(calls)]
        self.end = end
        self.sub_end = [0] * n  # calls i+1 .. sub_end[i]-1 run inside call i
        for i in range(n - 1, -1, -1):
            k = i + 1
            while k < n and end[k] < end[i]:
                k = self.sub_end[k]
            self.sub_end[i] = k
        self.anc: list[list[int]] = []
        stack: list[int] = []
        for i in range(n):
            while stack and self.sub_end[stack[-1]] <= i:
                stack.pop()
            self.anc.append(list(stack))
            stack.append(i)
        self._in: dict[int, dict[str, tuple | None]] = {}
        self._out: dict[int, dict[str, tuple | None]] = {}
        self._out_index: dict[tuple, list[tuple[int, str]]] | None = None
        self._in_index: dict[tuple, list[tuple[int, str]]] | None = None

    def inputs(self, i: int) -> dict[str, tuple | None]:
        if i not in self._in:
            self._in[i] = {p: fingerprint(v) for p, v in leaves(call_inputs(self.calls[i]), "in")}
        return self._in[i]

    def outputs(self, i: int) -> dict[str, tuple | None]:
        if i not in self._out:
            self._out[i] = {
                p: fingerprint(v) for p, v in leaves(self.calls[i].get("outputs"), "out")
            }
        return self._out[i]

    def _index(self, fingerprints) -> dict[tuple, list[tuple[int, str]]]:
        """Fingerprint -> the (call, leaf path) places where it occurs, in call order."""
        index: dict[tuple, list[tuple[int, str]]] = {}
        for i in range(len(self.calls)):
            for p, fp in fingerprints(i).items():
                if fp is not None:
                    index.setdefault(fp, []).append((i, p))
        return index

    def out_index(self) -> dict[tuple, list[tuple[int, str]]]:
        if self._out_index is None:
            self._out_index = self._index(self.outputs)
        return self._out_index

    def in_index(self) -> dict[tuple, list[tuple[int, str]]]:
        if self._in_index is None:
            self._in_index = self._index(self.inputs)
        return self._in_index

    def inside(self, i: int, j: int) -> bool:
        """Whether call j runs inside call i."""
        return i < j < self.sub_end[i]


def _location(tr: _Trace, i: int, cls: str) -> dict[str, Any]:
    call = tr.calls[i]
    if cls == "glue":
        parent = call.get("parent")
        where = f"glue in {parent} before {tr.keys[i]}" if parent else f"glue before {tr.keys[i]}"
        return {"name": tr.keys[i], "kind": cls, "module": parent or call["name"], "where": where}
    suffix = " (missing in candidate)" if cls == "missing" else f" ({call.get('type') or '?'})"
    return {"name": tr.keys[i], "kind": cls, "module": call["name"], "where": tr.keys[i] + suffix}


def _forward(tr: _Trace, rows: dict[str, dict]) -> dict[int, str]:
    n = len(tr.calls)
    failing = [i for i in range(n) if not rows[tr.keys[i]]["ok"]]
    cls: dict[int, str] = {}
    for i in sorted(range(n), key=lambda k: tr.end[k]):  # children before their parent
        row = rows[tr.keys[i]]
        if row["status"] == "only_ref":
            cls[i] = "missing" if _missing_matters(tr, rows, i) else "match"
        elif row["ok"]:
            cls[i] = "match"
        elif row["in_ok"] and row.get("rng_same") is False:
            cls[i] = "random stream"  # drew from a generator already in another state
        elif row["in_ok"] and row.get("out_noise"):
            cls[i] = "fp noise"
        elif row["in_ok"] and "own" in (row.get("rng_ref"), row.get("rng_cand")):
            inner = any(cls.get(j) in CULPRITS for j in range(i + 1, tr.sub_end[i]))
            cls[i] = "contains culprit" if inner else "random algorithm"
        elif row["in_ok"]:
            inner = any(cls.get(j) in CULPRITS for j in range(i + 1, tr.sub_end[i]))
            if inner:
                cls[i] = "contains culprit"
            else:
                cls[i] = "absorbed" if _absorbed(tr, rows, i) else "culprit"
        else:
            cls[i] = _victim_or_glue(tr, rows, i, failing)
    return cls


def _missing_matters(tr: _Trace, rows: dict[str, dict], i: int) -> bool:
    """Whether a call the candidate lacks fed a call whose inputs then differ."""
    for fp in tr.outputs(i).values():
        if fp is None:
            continue
        for j, _ in tr.in_index().get(fp, []):
            r = rows[tr.keys[j]]
            if j >= tr.sub_end[i] and r["status"] != "only_ref" and not r["in_ok"]:
                return True
    return False


def _absorbed(tr: _Trace, rows: dict[str, dict], i: int) -> bool:
    """Whether every call that consumed the differing outputs of call i produced a matching
    output (a BatchNorm after a conv whose bias differs), and none was passed on unchanged."""
    users: list[int] = []
    for path, ok in rows[tr.keys[i]].get("out_leaf_ok", {}).items():
        if ok:
            continue
        fp = tr.outputs(i).get(path)
        if fp is None or any(fp in tr.outputs(a).values() for a in tr.anc[i]):
            return False
        found = [j for j, _ in tr.in_index().get(fp, []) if j >= tr.sub_end[i]]
        if not found:
            return False
        users += found
    return bool(users) and all(rows[tr.keys[j]]["ok"] for j in users)


def _leaf_ok(tr: _Trace, rows: dict[str, dict], j: int, side: str, path: str) -> bool:
    row = rows[tr.keys[j]]
    if row["status"] == "only_ref":
        return False
    return bool(row.get(f"{side}_leaf_ok", {}).get(path, False))


def _victim_or_glue(tr: _Trace, rows: dict[str, dict], i: int, failing: list[int]) -> str:
    row = rows[tr.keys[i]]
    anc = set(tr.anc[i])
    bad = [p for p, ok in row.get("in_leaf_ok", {}).items() if not ok]
    verdicts = []
    for path in bad:
        fp = tr.inputs(i).get(path)
        source = None
        if fp is not None:
            for a in reversed(tr.anc[i]):  # an enclosing call already got it differing
                hit = [p for p, f in tr.inputs(a).items() if f == fp]
                if hit and not _leaf_ok(tr, rows, a, "in", hit[0]):
                    source = (a, "in", hit[0])
                    break
            for j, p in reversed(tr.out_index().get(fp, []) if source is None else []):
                if j < i and j not in anc:
                    source = (j, "out", p)
                    break
            if source is None:
                for a in reversed(tr.anc[i]):
                    hit = [p for p, f in tr.inputs(a).items() if f == fp]
                    if hit:
                        source = (a, "in", hit[0])
                        break
        if source is not None:
            verdicts.append("glue" if _leaf_ok(tr, rows, *source) else "victim")
        elif not tr.anc[i] and tr.calls[i]["name"] == "<root>":
            verdicts.append("victim")  # the model's own inputs: the batch differs
        else:
            earlier_bad = any(j < i and j not in anc for j in failing)
            anc_bad = any(not rows[tr.keys[a]]["in_ok"] for a in tr.anc[i])
            verdicts.append("victim" if earlier_bad or anc_bad else "glue")
    return "victim" if "victim" in verdicts or not verdicts else "glue"


def _backward(
    tr: _Trace, rows: dict[str, dict], grads: dict[str, dict], fwd: dict[int, str]
) -> dict[int, tuple[str, int | None]]:
    n = len(tr.calls)
    fwd_bad = {j for j in range(n) if not rows[tr.keys[j]]["ok"]}
    last_fwd_bad = max(fwd_bad, default=-1)
    named = [j for j in range(n) if fwd[j] in CULPRITS]
    last_grad_bad = max(
        (
            j
            for j in range(n)
            if rows[tr.keys[j]]["ok"] and not grads.get(tr.keys[j], {"ok": True})["ok"]
        ),
        default=-1,
    )
    out: dict[int, tuple[str, int | None]] = {}
    for i in sorted(range(n), key=lambda k: -tr.end[k]):
        g = grads.get(tr.keys[i])
        if g is None:
            continue
        if g["status"] == "only_ref":
            out[i] = ("missing", i)
            continue
        if g["ok"]:
            out[i] = ("match", None)
            continue
        if g.get("grad_noise"):
            out[i] = ("fp noise", i)
            continue
        if not rows[tr.keys[i]]["ok"]:
            out[i] = ("forward", None)
            continue
        anc = set(tr.anc[i])
        later = tr.sub_end[i]  # calls from here on ran after call i (or enclose it)
        victim, diverged, consumers = False, [], []
        for path, ok in g.get("grad_leaf_ok", {}).items():
            fp = None if ok else tr.outputs(i).get(path)
            if fp is None:
                continue
            users = [j for j, _ in tr.in_index().get(fp, []) if j >= later]
            users += [a for a in anc if fp in tr.outputs(a).values()]
            for j in users:
                consumers.append(j)
                if j in fwd_bad or rows[tr.keys[j]]["status"] == "only_ref":
                    diverged.append(j)
                elif not grads.get(tr.keys[j], {"ok": True})["ok"]:
                    victim = True
        if victim:
            out[i] = ("victim", None)
        elif diverged or last_fwd_bad >= later:
            after = [j for j in named if j >= later or j in anc]
            before = [j for j in named if j < i and j not in anc]  # e.g. q when i is v
            cause = min(after) if after else max(before) if before else None
            out[i] = ("culprit", cause if cause is not None else min(diverged or fwd_bad))
        elif consumers:
            out[i] = ("culprit", _innermost(tr, consumers))
        elif last_grad_bad >= later:
            out[i] = ("victim", None)
        else:
            out[i] = ("glue", i)
    return out


def _innermost(tr: _Trace, calls: list[int]) -> int:
    """The first of the calls that contains none of the others (where the data goes deepest)."""
    inner = [j for j in calls if not any(tr.inside(j, k) for k in calls if k != j)]
    return min(inner or calls)


def _entry(
    tr: _Trace, i: int, where: str, cls: str, direction: str, row: dict | None, module: str
) -> dict[str, Any]:
    row = row or {}
    return {
        "where": where,
        "class": cls,
        "direction": direction,
        "name": tr.keys[i],
        "module": module,
        "max_abs": row.get("max_abs"),
        "max_rel": row.get("max_rel"),
    }


def _user_class(kind: str) -> str:
    return "code" if kind == "culprit" else kind


def _free_list(tr: _Trace, rows, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The localised divergences of a free-running pair: forward culprits, then backward ones
    that name another place."""
    out = []
    for e in result["forward"]["calls"]:
        if e["class"] in (*CULPRITS, "fp noise"):
            i = tr.keys.index(e["name"])
            out.append(
                _entry(
                    tr,
                    i,
                    e["where"],
                    _user_class(e["class"]),
                    "forward",
                    rows.get(e["name"]),
                    e["module"],
                )
            )
    places = {e["where"] for e in out}
    for e in result["backward"]["calls"]:
        if e["class"] in (*CULPRITS, "fp noise") and e.get("where") and e["where"] not in places:
            places.add(e["where"])
            i = tr.keys.index(e.get("at") or e["name"])
            out.append(
                _entry(tr, i, e["where"], _user_class(e["class"]), "backward", None, e["module"])
            )
    return out


def _forced(tr: _Trace, rows: dict[str, dict], grads: dict[str, dict]) -> list[dict[str, Any]]:
    """Every call or glue region whose own computation differs, from a teacher-forced pair.

    Each matched call ran on the reference's inputs, so a differing output is the call's own
    error (its code, or for a call with children the parent's code after its last child), and a
    differing input is the parent's glue before it (everything before was replaced by the
    reference's values). Backward, each call's output gradient arrived from consumers that were
    fed the reference's gradients, so a difference is the innermost consumer's own backward.
    """
    n = len(tr.calls)
    found: list[tuple[int, dict[str, Any]]] = []
    own_places: dict[int, dict[str, Any]] = {}
    claimed_missing: set[int] = set()

    def parent_of(i: int) -> int | None:
        return tr.anc[i][-1] if tr.anc[i] else None

    for i in range(n):
        row = rows[tr.keys[i]]
        call = tr.calls[i]
        if row["status"] == "only_ref":
            continue
        if not row["in_ok"]:
            p = parent_of(i)
            gap = [
                m
                for m in range(p + 1 if p is not None else 0, i)
                if parent_of(m) == p
                and rows[tr.keys[m]]["status"] == "only_ref"
                and m not in claimed_missing
            ]
            if gap:
                m = gap[-1]
                claimed_missing.add(m)
                cls = "missing"
                where = f"{tr.keys[m]} (missing in candidate)"
                own_places[m] = _entry(
                    tr, m, where, cls, "forward", row["in_worst"], tr.calls[m]["name"]
                )
                found.append((m, own_places[m]))
            else:
                prow = rows.get(tr.keys[p], {}) if p is not None else {}
                drew = {prow.get("rng_ref"), prow.get("rng_cand")}
                cls = (
                    "fp noise"
                    if row.get("in_noise")
                    else ("random algorithm" if "own" in drew and len(drew) > 1 else "glue")
                )
                parent = call.get("parent")
                where = (
                    f"glue in {parent} before {tr.keys[i]}"
                    if parent
                    else (f"inputs of {tr.keys[i]}")
                )
                found.append(
                    (
                        i,
                        _entry(
                            tr, i, where, cls, "forward", row["in_worst"], parent or call["name"]
                        ),
                    )
                )
        if not row["ok"]:
            children = [j for j in range(i + 1, tr.sub_end[i]) if parent_of(j) == i]
            if row.get("out_noise"):
                cls = "fp noise"
            elif "own" in (row.get("rng_ref"), row.get("rng_cand")):
                cls = "random algorithm"
            else:
                cls = "glue" if children else "code"
            if children:
                last = max(children, key=lambda j: tr.end[j])
                where = f"glue in {tr.keys[i]} after {tr.keys[last]}"
            else:
                where = f"{tr.keys[i]} ({call.get('type') or '?'})"
            entry = _entry(tr, i, where, cls, "forward", row, call["name"])
            own_places[i] = entry
            found.append((i, entry))
    glue_modules = {e["module"] for _, e in found if e["class"] in ("glue", "random algorithm")}

    def readers(fp: tuple, after: int) -> list[int] | None:
        """Calls (from ``after`` on) that read the tensor with fingerprint ``fp``; None when one
        of them already got a differing value there forward (the glue before it, listed)."""
        out = []
        for j, path in tr.in_index().get(fp, []):
            if j < after:
                continue
            r = rows[tr.keys[j]]
            if r["status"] == "only_ref" and j not in own_places:
                continue
            if not r.get("in_leaf_ok", {}).get(path, True) or tr.calls[j]["name"] in glue_modules:
                return None
            out.append(j)
        return out

    def blame(j: int, g: dict, noise: bool) -> None:
        """Call j's own backward differs (a parent: its code around its children)."""
        if j in own_places:
            own_places[j].setdefault("also", "backward")
            return
        has_children = tr.sub_end[j] > j + 1
        cls = "fp noise" if noise else ("glue" if has_children else "code")
        where = (
            f"glue in {tr.keys[j]} (backward)"
            if has_children
            else f"{tr.keys[j]} ({tr.calls[j].get('type') or '?'})"
        )
        own_places[j] = _entry(tr, j, where, cls, "backward", g, tr.calls[j]["name"])
        found.append((j, own_places[j]))

    for i in sorted(range(n), key=lambda k: -tr.end[k]):
        g = grads.get(tr.keys[i])
        if g is None or g["ok"] or g["status"] == "only_ref":
            continue
        # an input's gradient (summed over its readers) differs: its innermost reader's backward
        for path, ok in g.get("grad_in_leaf_ok", {}).items():
            fp = None if ok else tr.inputs(i).get(path)
            if fp is None or not rows[tr.keys[i]].get("in_leaf_ok", {}).get(path, True):
                continue
            found_readers = readers(fp, 0)
            if found_readers is not None:
                blame(_innermost(tr, sorted(set(found_readers or [i]))), g, g.get("grad_in_noise"))
        # the gradient arriving at an output differs: the innermost call that read it
        users: list[int] = []
        covered = False
        for path, ok in g.get("grad_leaf_ok", {}).items():
            fp = None if ok else tr.outputs(i).get(path)
            if fp is None:
                continue
            found_users = readers(fp, tr.sub_end[i])
            if found_users is None:
                covered = True
            else:
                users += found_users
        if covered:
            continue
        if users:
            blame(_innermost(tr, sorted(set(users))), g, g.get("grad_noise"))
        elif not all(g.get("grad_leaf_ok", {}).values()):
            parent = tr.calls[i].get("parent")
            where = f"glue in {parent} after {tr.keys[i]}"
            if not any(e["where"] == where for _, e in found):
                cls = "fp noise" if g.get("grad_noise") else "glue"
                module = parent or tr.calls[i]["name"]
                found.append((i, _entry(tr, i, where, cls, "backward", g, module)))
    found.sort(key=lambda x: x[0])
    merged: list[dict[str, Any]] = []
    for _, e in found:  # one entry per glue region of a parent, named by its first change
        same = next(
            (
                m
                for m in merged
                if m["module"] == e["module"]
                and {m["class"], e["class"]} <= {"glue", "random algorithm"}
            ),
            None,
        )
        if same is None:
            merged.append(e)
        elif same["direction"] != e["direction"]:
            same["also"] = "backward"
            same.setdefault("also_at", []).append(e["where"])
            if e["direction"] == "forward":  # the forward change names the region
                same.update(
                    where=e["where"], name=e["name"], direction="forward", **{"class": e["class"]}
                )
        elif " before " in e["where"] and " before " not in same["where"]:
            same.setdefault("also_at", []).append(same["where"])
            same.update(where=e["where"], name=e["name"])
        else:
            same.setdefault("also_at", []).append(e["where"])
    position = {k: n for n, k in enumerate(tr.keys)}
    merged.sort(key=lambda e: position.get(e["name"], n))  # in the reference's execution order
    return merged


def _first(entries: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    for e in entries:
        if e["class"] in ("code", "glue", "missing", "random algorithm") and (
            e["direction"] == direction or e.get("also") == direction
        ):
            kind = "culprit" if e["class"] in ("code", "random algorithm") else e["class"]
            return {"name": e["name"], "kind": kind, "module": e["module"], "where": e["where"]}
    return None


def analyse(
    calls: list[dict[str, Any]],
    out_rows: list[dict[str, Any]],
    grad_rows: list[dict[str, Any]],
    forced: bool = False,
) -> dict[str, Any]:
    """Forward and backward classification of the reference's calls (see module docstring),
    and ``divergences``: every localised divergence in execution order. ``forced``: the
    candidate was teacher-forced, so each call's difference is its own (see ``_forced``)."""
    result: dict[str, Any] = {**empty(), "divergences": []}
    if not calls:
        return result
    tr = _Trace(calls)
    rows = {r["name"]: r for r in out_rows}
    grads = {r["name"]: r for r in grad_rows}
    if forced:
        entries = _forced(tr, rows, grads)
        result["divergences"] = entries
        result["forced"] = True
        result["forward"]["calls"] = [e for e in entries if e["direction"] == "forward"]
        result["backward"]["calls"] = [e for e in entries if e["direction"] == "backward"]
        result["forward"]["first"] = _first(entries, "forward")
        result["backward"]["first"] = _first(entries, "backward")
        return result
    fwd = _forward(tr, rows)
    listed = []
    for i in range(len(calls)):
        if fwd[i] != "match":
            listed.append({**_location(tr, i, fwd[i]), "class": fwd[i]})
    result["forward"]["calls"] = listed
    first = next((i for i in range(len(calls)) if fwd[i] in CULPRITS), None)
    result["forward"]["first"] = None if first is None else _location(tr, first, fwd[first])
    bwd = _backward(tr, rows, grads, fwd)
    order = sorted(bwd, key=lambda k: -tr.end[k])
    blisted = []
    for i in order:
        cls, at = bwd[i]
        if cls == "match":
            continue
        entry = {"name": tr.keys[i], "class": cls}
        if cls == "glue":
            parent = tr.calls[i].get("parent")
            entry.update(
                at=tr.keys[i],
                module=parent or tr.calls[i]["name"],
                where=f"glue in {parent} after {tr.keys[i]}",
            )
        elif at is not None:
            where = _location(tr, at, fwd[at] if fwd.get(at) in CULPRITS else cls)
            entry.update(at=where["name"], module=where["module"], where=where["where"])
        blisted.append(entry)
    result["backward"]["calls"] = blisted
    bfirst = next((e for e in blisted if e["class"] in CULPRITS), None)
    if bfirst is not None:
        result["backward"]["first"] = {
            "name": bfirst["name"],
            "kind": bfirst["class"],
            "module": bfirst["module"],
            "where": bfirst["where"] + f" (gradient first differs at {bfirst['name']})",
        }
    if result["backward"]["first"] is None and any(
        not g["ok"] and not g.get("grad_noise") for g in grad_rows
    ):
        # every differing gradient comes from calls whose forward already differs: the forward
        # culprit is where the backward difference starts too
        result["backward"]["first"] = result["forward"]["first"]
    result["divergences"] = _free_list(tr, rows, result)
    return result
