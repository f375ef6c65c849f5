"""NeMo-style JSON-lines manifests: audio entries (filtered by duration) and noise entries.

An audio entry names its file with ``audio_filepath`` (or ``audio_filename``) and may give
``duration`` and ``offset`` in seconds, ``speaker``, ``orig_sample_rate`` and ``lang``; text is
ignored.
Several manifests are given as a list or as one comma-separated string; their entries are read in
order and keep that order (no sorting).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: Relative paths this long or longer are used as given (NeMo's limit).
PATH_LEN_LIMIT = 255


class ManifestError(ValueError):
    """A manifest cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class AudioEntry:
    id: int
    audio_file: str
    duration: float | None
    offset: float | None
    speaker: Any = None
    orig_sr: int | None = None
    lang: str | None = None


def manifest_list(value: str | Iterable[str] | None) -> list[str]:
    """A comma-separated string (split on ',' exactly as NeMo does) or a list of paths."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split(",")
    return [str(v) for v in value]


def resolve_audio_path(audio_file: str, manifest: str) -> str:
    """A relative path is taken relative to the manifest's folder when the file exists there."""
    if len(audio_file) < PATH_LEN_LIMIT and not os.path.isabs(audio_file):
        candidate = os.path.join(os.path.dirname(manifest), audio_file)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return os.path.expanduser(audio_file)


def _json_lines(manifest: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(os.path.expanduser(manifest), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ManifestError(f"{manifest}: cannot read manifest ({exc.strerror})") from None
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{manifest}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ManifestError(f"{manifest}:{lineno}: a manifest line must be a JSON object")
        yield lineno, item


def read_audio_manifests(
    manifests: str | Iterable[str],
    min_duration: float | None = None,
    max_duration: float | None = None,
) -> list[AudioEntry]:
    """Entries of all manifests in order, without those outside [min_duration, max_duration]."""
    entries: list[AudioEntry] = []
    next_id = 0
    for manifest in manifest_list(manifests):
        for lineno, item in _json_lines(manifest):
            raw = item.get("audio_filename", item.get("audio_filepath"))
            if raw is None:
                raise ManifestError(f"{manifest}:{lineno}: no 'audio_filepath' or 'audio_filename'")
            entry_id, next_id = next_id, next_id + 1
            duration = item.get("duration")
            if duration is not None and (
                (min_duration is not None and duration < min_duration)
                or (max_duration is not None and duration > max_duration)
            ):
                continue
            entries.append(
                AudioEntry(
                    id=entry_id,
                    audio_file=resolve_audio_path(raw, manifest),
                    duration=duration,
                    offset=item.get("offset"),
                    speaker=item.get("speaker"),
                    orig_sr=item.get("orig_sample_rate"),
                    lang=item.get("lang"),
                )
            )
    return entries


def read_noise_manifests(manifests: str | Iterable[str] | None) -> list[dict[str, Any]]:
    """All noise entries (unfiltered) as dicts, ``audio_filepath`` resolved."""
    noise: list[dict[str, Any]] = []
    for manifest in manifest_list(manifests):
        for lineno, item in _json_lines(manifest):
            if "audio_filepath" not in item:
                raise ManifestError(f"{manifest}:{lineno}: noise entry has no 'audio_filepath'")
            item["audio_filepath"] = resolve_audio_path(item["audio_filepath"], manifest)
            noise.append(item)
    return noise
