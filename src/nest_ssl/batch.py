"""The batch type of NEST pretraining: clean audio, noise and their mix, with lengths."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AudioNoiseItem:
    """One dataset item before collation (the field names of NeMo's item)."""

    sample_id: str | None = None
    audio: Tensor | None = None
    audio_len: Tensor | None = None
    noise: Tensor | None = None
    noise_len: Tensor | None = None
    noisy_audio: Tensor | None = None
    noisy_audio_len: Tensor | None = None


@dataclass
class AudioNoiseBatch:
    """A collated batch; fields and their order are NeMo's, ``sample_id`` stays None."""

    sample_id: list | None = None
    audio: Tensor | None = None
    audio_len: Tensor | None = None
    noise: Tensor | None = None
    noise_len: Tensor | None = None
    noisy_audio: Tensor | None = None
    noisy_audio_len: Tensor | None = None
