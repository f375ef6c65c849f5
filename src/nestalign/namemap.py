"""Translate candidate names (state_dict keys, module call names) to reference names.

A name map is a YAML file:

    exact:                      # candidate name -> reference name, tried first
      enc.pre_encode.conv.0: encoder.pre_encode.conv.0
    regex:                      # tried in order; the first full match wins (re.sub syntax)
      - ['^enc\\.(.*)$', 'encoder.\\1']
    ignore:                     # names (after mapping) left out of the comparison, listed apart
      - '^encoder\\.debug_probe(\\..*)?$'
    transforms:                 # tensor rules for state_dict-like items, first full match wins
      - match: 'enc\\.(\\d+)\\.qkv\\.weight'        # a fused [3D, D] tensor split in equal parts
        split: {dim: 0, into: ['encoder.\\1.linear_q.weight', 'encoder.\\1.linear_k.weight',
                               'encoder.\\1.linear_v.weight']}
      - match: 'enc\\.out\\.weight'                   # stored transposed: permute, then rename
        transpose: [1, 0]
      - match: 'enc\\.pos'                            # another shape: reshape, then rename
        reshape: [1, 16, 8]

Rules apply to whole names and to a name's dotted prefixes, longest first: ``enc.layers.0.weight``
maps with the rule for ``enc.layers.0`` when no rule matches the full name, so one rule covers a
module, its parameters and its calls. Exact rules are tried on every prefix before any regex.

Transforms apply to tensors keyed by state_dict name (initial weights, gradients, weights, and
the shapes of model_structure.json): ``map_state`` turns candidate tensors into reference ones,
``unmap_state`` builds candidate tensors from reference ones (strict: for ``init_from``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

TRANSFORM_KINDS = ("split", "transpose", "reshape")


class NameMapError(ValueError):
    """A name map file that cannot be read or has a bad rule."""


class NameMap:
    def __init__(
        self,
        exact: dict[str, str] | None = None,
        regex: list[tuple[str, str]] | None = None,
        ignore: list[str] | None = None,
        transforms: list[dict[str, Any]] | None = None,
    ):
        self.exact = dict(exact or {})
        self.regex = [(re.compile(p), r) for p, r in (regex or [])]
        self.ignore = [re.compile(p) for p in (ignore or [])]
        self.transforms = [
            _transform(rule, i, "transforms") for i, rule in enumerate(transforms or [])
        ]

    @classmethod
    def load(cls, path: str | os.PathLike) -> NameMap:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise NameMapError(f"{path}: cannot read name map ({exc})") from exc
        if not isinstance(data, dict) or set(data) - {"exact", "regex", "ignore", "transforms"}:
            raise NameMapError(
                f"{path}: expected a mapping with keys exact, regex, ignore, transforms"
            )
        exact = data.get("exact") or {}
        regex = data.get("regex") or []
        ignore = data.get("ignore") or []
        if not isinstance(exact, dict):
            raise NameMapError(f"{path}: 'exact' must map candidate names to reference names")
        if not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in regex):
            raise NameMapError(f"{path}: each 'regex' rule must be [pattern, replacement]")
        transforms = data.get("transforms") or []
        if not isinstance(transforms, list):
            raise NameMapError(f"{path}: 'transforms' must be a list of rules")
        try:
            return cls({str(k): str(v) for k, v in exact.items()}, regex, list(ignore), transforms)
        except NameMapError as exc:
            raise NameMapError(f"{path}: {exc}") from exc
        except re.error as exc:
            raise NameMapError(f"{path}: bad regular expression ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "exact": dict(self.exact),
            "regex": [[p.pattern, r] for p, r in self.regex],
            "ignore": [p.pattern for p in self.ignore],
            "transforms": [
                {k: (v.pattern if k == "match" else v) for k, v in t.items()}
                for t in self.transforms
            ],
        }

    def _regex(self, name: str) -> str | None:
        for pattern, repl in self.regex:
            if pattern.fullmatch(name):
                return pattern.sub(repl, name, count=1)
        return None

    def map(self, name: str) -> str:
        """The reference name of candidate ``name`` (itself when no rule applies)."""
        parts = name.split(".")
        for rule in (self.exact.get, self._regex):
            for cut in range(len(parts), 0, -1):
                mapped = rule(".".join(parts[:cut]))
                if mapped is not None:
                    return ".".join([mapped, *parts[cut:]]) if mapped else ".".join(parts[cut:])
        return name

    def ignored(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self.ignore)

    # -- tensor transforms ------------------------------------------------------------------
    def _rule(self, cand_name: str) -> tuple[dict[str, Any], re.Match] | None:
        for rule in self.transforms:
            m = rule["match"].fullmatch(cand_name)
            if m:
                return rule, m
        return None

    def map_shape(self, cand_name: str, shape: list[int]) -> list[tuple[str, list[int]]]:
        """(reference name, shape) of each reference item candidate ``cand_name`` stands for."""
        shape = [int(s) for s in shape]
        found = self._rule(cand_name)
        if found is None:
            return [(self.map(cand_name), shape)]
        rule, m = found
        if "split" in rule:
            dim, names = _split_parts(rule, m, shape, cand_name)
            part = [*shape]
            part[dim] = shape[dim] // len(names)
            return [(n, list(part)) for n in names]
        if "transpose" in rule:
            perm = _perm(rule, len(shape), cand_name)
            return [(self.map(cand_name), [shape[p] for p in perm])]
        ref_shape = list(rule["reshape"])
        if math.prod(ref_shape) != math.prod(shape):
            raise NameMapError(
                f"transform {rule['match'].pattern!r}: {cand_name} of shape {shape} cannot be "
                f"reshaped to {ref_shape}"
            )
        return [(self.map(cand_name), ref_shape)]

    def map_state(self, cand: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Candidate tensors under reference names, transformed; and reference name ->
        original candidate name. Items that are not tensors are only renamed."""
        out: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for name, value in cand.items():
            found = self._rule(name) if isinstance(value, torch.Tensor) else None
            if found is None:
                ref_name = self.map(name)
                out[ref_name], origin[ref_name] = value, name
                continue
            rule, m = found
            if "split" in rule:
                dim, names = _split_parts(rule, m, list(value.shape), name)
                for ref_name, part in zip(names, value.chunk(len(names), dim), strict=True):
                    out[ref_name], origin[ref_name] = part.contiguous(), name
                continue
            if "transpose" in rule:
                moved = value.permute(_perm(rule, value.dim(), name)).contiguous()
            else:
                self.map_shape(name, list(value.shape))  # checks the element count
                moved = value.reshape(rule["reshape"]).contiguous()
            ref_name = self.map(name)
            out[ref_name], origin[ref_name] = moved, name
        return out, origin

    def unmap_state(
        self, ref_state: dict[str, Any], cand_shapes: dict[str, list[int]]
    ) -> dict[str, torch.Tensor]:
        """Candidate-named tensors built from reference tensors (the inverse of ``map_state``):
        split parts are concatenated, transposes undone, reshapes reversed. Strict: a missing
        reference name or a shape that does not fit raises NameMapError naming every one.
        Candidate names whose reference name is ignored are left out."""
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        bad: list[str] = []
        for name, shape in cand_shapes.items():
            shape = [int(s) for s in shape]
            try:
                parts = self.map_shape(name, shape)
            except NameMapError as exc:
                bad.append(str(exc))
                continue
            if all(self.ignored(ref_name) for ref_name, _ in parts):
                continue
            absent = [ref_name for ref_name, _ in parts if ref_name not in ref_state]
            if absent:
                missing += [f"{n} (for {name})" for n in absent]
                continue
            wrong = [
                f"{ref_name} has shape {list(ref_state[ref_name].shape)}, {want} expected"
                for ref_name, want in parts
                if list(ref_state[ref_name].shape) != want
            ]
            if wrong:
                bad += [f"{w} (for {name} of shape {shape})" for w in wrong]
                continue
            found = self._rule(name)
            tensors = [ref_state[ref_name] for ref_name, _ in parts]
            if found is None:
                value = tensors[0]
            elif "split" in found[0]:
                value = torch.cat(tensors, dim=int(found[0]["split"]["dim"]) % len(shape))
            elif "transpose" in found[0]:
                perm = _perm(found[0], len(shape), name)
                inverse = sorted(range(len(perm)), key=perm.__getitem__)
                value = tensors[0].permute(inverse)
            else:
                value = tensors[0].reshape(shape)
            out[name] = value.contiguous()
        if missing or bad:
            msg = []
            if missing:
                msg.append(f"reference names missing: {', '.join(missing)}")
            if bad:
                msg.append(f"shapes do not fit: {'; '.join(bad)}")
            raise NameMapError("cannot build the candidate state: " + "; ".join(msg))
        return out


def _transform(rule: Any, index: int, where: str) -> dict[str, Any]:
    """A validated transform rule (the regex compiled); NameMapError names the rule."""
    label = f"{where}[{index}]"
    if not isinstance(rule, dict) or "match" not in rule:
        raise NameMapError(f"{label}: expected {{match: REGEX, split|transpose|reshape: ...}}")
    label = f"{label} (match {rule['match']!r})"
    kinds = [k for k in TRANSFORM_KINDS if k in rule]
    unknown = set(rule) - {"match", *TRANSFORM_KINDS}
    if unknown or len(kinds) != 1:
        raise NameMapError(
            f"{label}: needs exactly one of {', '.join(TRANSFORM_KINDS)}"
            + (f"; unknown keys {sorted(unknown)}" if unknown else "")
        )
    try:
        pattern = re.compile(str(rule["match"]))
    except re.error as exc:
        raise NameMapError(f"{label}: bad regular expression ({exc})") from exc
    kind, spec = kinds[0], rule[kinds[0]]
    out: dict[str, Any] = {"match": pattern}
    if kind == "split":
        into = spec.get("into") if isinstance(spec, dict) else None
        if (
            not isinstance(spec, dict)
            or set(spec) - {"dim", "into"}
            or not isinstance(spec.get("dim", 0), int)
            or isinstance(spec.get("dim", 0), bool)
            or not isinstance(into, list)
            or len(into) < 2
            or not all(isinstance(t, str) for t in into)
        ):
            raise NameMapError(
                f"{label}: split must be {{dim: INT, into: [REF_NAME, REF_NAME, ...]}}"
            )
        out["split"] = {"dim": int(spec.get("dim", 0)), "into": list(into)}
    else:
        if (
            not isinstance(spec, list)
            or not spec
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in spec)
        ):
            raise NameMapError(f"{label}: {kind} must be a list of integers")
        if kind == "transpose" and sorted(spec) != list(range(len(spec))):
            raise NameMapError(f"{label}: transpose must be a permutation of 0..{len(spec) - 1}")
        if kind == "reshape" and any(d < 0 for d in spec):
            raise NameMapError(f"{label}: reshape needs the full reference shape (no -1)")
        out[kind] = [int(d) for d in spec]
    return out


def _split_parts(
    rule: dict[str, Any], m: re.Match, shape: list[int], name: str
) -> tuple[int, list[str]]:
    names = [m.expand(t) for t in rule["split"]["into"]]
    if not shape:
        raise NameMapError(f"transform {rule['match'].pattern!r}: {name} is a scalar")
    dim = rule["split"]["dim"] % len(shape)
    if shape[dim] % len(names):
        raise NameMapError(
            f"transform {rule['match'].pattern!r}: {name} of shape {shape} cannot be split in "
            f"{len(names)} equal parts along dim {dim}"
        )
    return dim, names


def _perm(rule: dict[str, Any], ndim: int, name: str) -> list[int]:
    perm = rule["transpose"]
    if len(perm) != ndim:
        raise NameMapError(
            f"transform {rule['match'].pattern!r}: {name} has {ndim} dims, "
            f"transpose {perm} has {len(perm)}"
        )
    return perm


IDENTITY = NameMap()
