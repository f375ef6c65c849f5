"""Deterministic synthetic audio and NeMo-style manifests for alignment runs.

Speech-like clips are voiced tones (a wandering pitch with harmonics under a syllable envelope)
plus a little noise; noise clips are coloured noise. Every value comes from one numpy Generator
seeded by the config, and durations are whole numbers of samples, so the same config gives the
same bytes. Manifest audio paths are relative to the manifest's folder, as NeMo resolves them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SUBTYPES = {"pcm16": "PCM_16", "float": "FLOAT"}


@dataclass(frozen=True)
class ClipSet:
    name: str
    count: int
    min_duration: float
    max_duration: float
    kind: str  # "speech" or "noise"


def speech(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, np.pi)))
    x = 0.3 * syllables * voiced + 0.01 * rng.standard_normal(n)
    return (0.5 * x / max(np.abs(x).max(), 1e-9)).astype(np.float32)


def noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    white = rng.standard_normal(n + 64)
    taps = np.hanning(rng.integers(1, 63) + 2)[1:-1]  # without the zero end points
    coloured = np.convolve(white, taps / taps.sum(), mode="same")[:n]
    return (0.3 * coloured / max(np.abs(coloured).max(), 1e-9)).astype(np.float32)


def clip_sets(cfg: dict[str, Any]) -> list[ClipSet]:
    """The clip sets a data config asks for, including the special cases it opts into."""
    sets = [
        ClipSet("train", cfg["train"]["count"], *_range(cfg["train"]), "speech"),
        ClipSet("val", cfg["val"]["count"], *_range(cfg["val"]), "speech"),
        ClipSet("noise", cfg["noise"]["count"], *_range(cfg["noise"]), "noise"),
    ]
    short = cfg.get("short_train_clips", 0)
    if short:  # under NeMo's min_duration (1.0 s): the dataset drops them
        sets.append(ClipSet("train", short, 0.3, 0.9, "speech"))
    short_noise = cfg.get("short_noise_clips", 0)
    if short_noise:  # shorter than any speech clip: zero-padded, noise_len stays short
        sets.append(ClipSet("noise", short_noise, 0.2, 0.5, "noise"))
    return sets


def _range(section: dict[str, Any]) -> tuple[float, float]:
    return float(section["min_duration"]), float(section["max_duration"])


def make_data(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write wavs under out_dir/<set>/ and out_dir/<set>_manifest.json; returns the manifests."""
    out = Path(out_dir)
    sr = int(cfg["sample_rate"])
    subtype = SUBTYPES[cfg.get("format", "pcm16")]
    rng = np.random.default_rng(int(cfg["seed"]))
    lines: dict[str, list[str]] = {"train": [], "val": [], "noise": []}
    for name in lines:  # no stale clips from an earlier, larger config
        shutil.rmtree(out / name, ignore_errors=True)
    for clips in clip_sets(cfg):
        (out / clips.name).mkdir(parents=True, exist_ok=True)
        make = speech if clips.kind == "speech" else noise
        for _ in range(clips.count):
            index = len(lines[clips.name])
            n = int(round(rng.uniform(clips.min_duration, clips.max_duration) * sr))
            rel = f"{clips.name}/{clips.name}_{index:04d}.wav"
            sf.write(out / rel, make(rng, n, sr), sr, subtype=subtype, format="WAV")
            entry = {"audio_filepath": rel, "duration": n / sr, "text": "", "offset": 0.0}
            lines[clips.name].append(json.dumps(entry))
    manifests = {}
    for name, entries in lines.items():
        path = out / f"{name}_manifest.json"
        path.write_text("".join(line + "\n" for line in entries))
        manifests[name] = path
    return manifests
