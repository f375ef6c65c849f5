"""Up-front checks of the manifests and audio files a capture will read.

Both frameworks would fail deep inside a DataLoader worker on a bad file (or, for noise, silently
retry another clip). Checking first gives one clear error naming the manifest, the line and the
audio file, before any training starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import soundfile as sf


class ManifestError(SystemExit):
    """A manifest or an audio file it names cannot be used (exits with the message)."""


def manifest_paths(value: Any) -> list[Path]:
    """A comma-separated string or a list of manifest paths, as NeMo accepts them."""
    if value is None:
        return []
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    return [Path(str(p).strip()) for p in items if str(p).strip()]


def audio_path(entry: dict[str, Any], manifest: Path) -> Path:
    raw = entry.get("audio_filepath", entry.get("audio_filename"))
    if raw is None:
        raise KeyError("audio_filepath")
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists():
        path = manifest.parent / path
    return path


def check_manifest(manifest: Path) -> int:
    """Every line parses and names a readable audio file; returns the number of entries."""
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found")
    count = 0
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            entry = json.loads(line)
            path = audio_path(entry, manifest)
        except ValueError as exc:
            raise ManifestError(f"{where}: not a JSON object ({exc})") from None
        except KeyError:
            raise ManifestError(f"{where}: no audio_filepath key") from None
        if not path.is_file():
            raise ManifestError(f"{where}: audio file not found: {path}")
        try:
            info = sf.info(str(path))
        except Exception as exc:  # libsndfile reports corrupt files with several exception types
            raise ManifestError(f"{where}: cannot read audio file {path}: {exc}") from None
        if info.frames == 0 and entry.get("duration", 1) not in (0, 0.0, None):
            raise ManifestError(f"{where}: audio file {path} holds no samples")
        count += 1
    return count


def check_manifests(model_cfg: Any) -> None:
    """Check the train, noise and validation manifests named in a NEST model config."""
    sections = [
        model_cfg.get("train_ds", {}).get("manifest_filepath"),
        model_cfg.get("train_ds", {}).get("noise_manifest"),
        model_cfg.get("validation_ds", {}).get("manifest_filepath"),
        model_cfg.get("validation_ds", {}).get("noise_manifest"),
    ]
    for value in sections:
        for manifest in manifest_paths(value):
            check_manifest(manifest)
