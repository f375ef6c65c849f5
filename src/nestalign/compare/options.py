"""Command-line options the compare scripts share: tolerances and the name map."""

from __future__ import annotations

import argparse
from typing import Any

from nestalign.compare.tolerances import load_tolerances
from nestalign.namemap import NameMap


def add_tolerance_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance")
    parser.add_argument(
        "--tolerances",
        help="YAML file or inline mapping: atol, rtol, noise_factor, categories",
    )
    parser.add_argument("--name-map", help="YAML: candidate -> reference name rules")


def tolerance_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[dict[str, Any], NameMap | None]:
    """(tolerances, name map) from the options; a bad file or value ends with parser.error."""
    try:
        tols = load_tolerances(args.tolerances, args.atol, args.rtol)
        name_map = NameMap.load(args.name_map) if args.name_map else None
    except ValueError as exc:  # ToleranceError and NameMapError
        parser.error(f"--tolerances/--name-map: {exc}")
    return tols, name_map


def parse_steps(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """``0,1,2`` as sorted distinct steps; anything else ends with parser.error."""
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 0:
        parser.error(f"--steps: expected step numbers like 0,1,2, got {text!r}")
    return steps
