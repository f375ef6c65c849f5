"""Translate candidate names (state_dict keys, module call names) to reference names.

A name map is a YAML file:

    exact:                      # candidate name -> reference name, tried first
      enc.pre_encode.conv.0: encoder.pre_encode.conv.0
    regex:                      # tried in order; the first full match wins (re.sub syntax)
      - ['^enc\\.(.*)$', 'encoder.\\1']
    ignore:                     # names (after mapping) left out of the comparison, listed apart
      - '^encoder\\.debug_probe(\\..*)?$'

Rules apply to whole names and to a name's dotted prefixes, longest first: ``enc.layers.0.weight``
maps with the rule for ``enc.layers.0`` when no rule matches the full name, so one rule covers a
module, its parameters and its calls. Exact rules are tried on every prefix before any regex.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml


class NameMapError(ValueError):
    """A name map file that cannot be read or has a bad rule."""


class NameMap:
    def __init__(
        self,
        exact: dict[str, str] | None = None,
        regex: list[tuple[str, str]] | None = None,
        ignore: list[str] | None = None,
    ):
        self.exact = dict(exact or {})
        self.regex = [(re.compile(p), r) for p, r in (regex or [])]
        self.ignore = [re.compile(p) for p in (ignore or [])]

    @classmethod
    def load(cls, path: str | os.PathLike) -> NameMap:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise NameMapError(f"{path}: cannot read name map ({exc})") from exc
        if not isinstance(data, dict) or set(data) - {"exact", "regex", "ignore"}:
            raise NameMapError(f"{path}: expected a mapping with keys exact, regex, ignore")
        exact = data.get("exact") or {}
        regex = data.get("regex") or []
        ignore = data.get("ignore") or []
        if not isinstance(exact, dict):
            raise NameMapError(f"{path}: 'exact' must map candidate names to reference names")
        if not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in regex):
            raise NameMapError(f"{path}: each 'regex' rule must be [pattern, replacement]")
        try:
            return cls({str(k): str(v) for k, v in exact.items()}, regex, list(ignore))
        except re.error as exc:
            raise NameMapError(f"{path}: bad regular expression ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "exact": dict(self.exact),
            "regex": [[p.pattern, r] for p, r in self.regex],
            "ignore": [p.pattern for p in self.ignore],
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


IDENTITY = NameMap()
