"""Batch augmentation of NEST: mix each utterance with noise or with other speakers' speech.

Uses Python's global ``random`` only, with NeMo's draws in NeMo's order and count (calls such as
``randint(1, 1)`` still advance the generator), and NeMo's float32 tensor arithmetic for the
energies. Skipped items keep their raw noise and noise length.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from nest_ssl.batch import AudioNoiseBatch

#: ``_target_`` values accepted for the batch augmentor (NeMo's class paths and ours).
TARGETS = (
    "nemo.collections.asr.modules.ssl_modules.MultiSpeakerNoiseAugmentation",
    "nemo.collections.asr.modules.ssl_modules.augmentation.MultiSpeakerNoiseAugmentation",
    "nest_ssl.augmentation.MultiSpeakerNoiseAugmentation",
)


def _tile(signal: Tensor, length: Any, target: int) -> Tensor:
    """The first ``length`` samples repeated until they cover ``target`` samples, cut to it."""
    signal = signal[:length]
    if length < target:
        signal = signal.repeat(target // length + 1)
    return signal[:target]


def _fit(signal: Tensor, target: int) -> Tensor:
    """Zero-pad or cut to ``target`` samples."""
    if signal.size(0) < target:
        return F.pad(signal, (0, target - signal.size(0)))
    return signal[:target]


class MultiSpeakerNoiseAugmentation:
    """Adds noise or other utterances of the batch at a random energy ratio (in dB)."""

    def __init__(
        self,
        prob: float = 0.0,
        noise_ratio: float = 0.0,
        min_r_speech: float = -5.0,
        max_r_speech: float = 5.0,
        min_r_noise: float = -5.0,
        max_r_noise: float = 20.0,
        min_mix_rate: float = 0.0,
        max_mix_rate: float = 1.0,
        min_num_segments: int = 1,
        max_num_segments: int = 5,
        min_num_speakers: int = 1,
        max_num_speakers: int = 4,
    ):
        checks = {
            "prob must be in [0, 1]": 0 <= prob <= 1,
            "noise_ratio must be in [0, 1]": 0 <= noise_ratio <= 1,
            "min_r_speech must not exceed max_r_speech": min_r_speech <= max_r_speech,
            "min_r_noise must not exceed max_r_noise": min_r_noise <= max_r_noise,
            "need 0 <= min_mix_rate <= max_mix_rate <= 1": 0 <= min_mix_rate <= max_mix_rate <= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"batch_augmentor: {message}")
        self.prob, self.noise_ratio = prob, noise_ratio
        self.speech_db = (min_r_speech, max_r_speech)
        self.noise_db = (min_r_noise, max_r_noise)
        self.mix_rate = (min_mix_rate, max_mix_rate)
        self.num_segments = (min_num_segments, max_num_segments)
        self.num_speakers = (min_num_speakers, max_num_speakers)

    @classmethod
    def from_config(cls, cfg: Any) -> MultiSpeakerNoiseAugmentation:
        """Build from a ``batch_augmentor`` config section (``_target_`` plus arguments)."""
        kwargs = {str(k): v for k, v in dict(cfg).items() if k != "_target_"}
        target = dict(cfg).get("_target_")
        if target not in TARGETS:
            raise ValueError(
                f"batch_augmentor._target_ {target!r} is not supported; use one of {TARGETS}"
            )
        return cls(**kwargs)

    def __call__(self, batch: AudioNoiseBatch) -> AudioNoiseBatch:
        audio, lengths = batch.audio, batch.audio_len
        noise, noise_len = batch.noise, batch.noise_len
        batch_size = audio.size(0)
        for i in range(batch_size):
            if random.random() > self.prob:
                continue
            low, high = self.mix_rate
            mix_rate = random.uniform(low, high) if 0 <= low < high <= 1 else low
            mix_len = max(1, int(lengths[i] * mix_rate))
            num_segments = random.randint(*self.num_segments)
            num_speakers = min(random.randint(*self.num_speakers), batch_size)
            picks = random.choices(range(num_segments), k=mix_len)
            segment_lens = list(Counter(picks).values())
            if random.random() < self.noise_ratio or batch_size == 1:
                mode, energy_db = "noise", random.uniform(*self.noise_db)
            else:
                mode, energy_db = "speech", random.uniform(*self.speech_db)
            if mode == "noise":
                segments = self._noise_segments(i, batch, segment_lens)
            else:
                segments = self._speech_segments(i, batch, segment_lens, num_speakers)

            mixed = torch.zeros_like(audio[i])
            lo, hi = 0, lengths[i] - mix_len
            for j in range(num_segments):
                start = random.randint(lo, hi - 1) if lo < hi else lo
                mixed[start : start + segment_lens[j]] = segments[j]
                lo = start + segment_lens[j]
                hi = hi + segment_lens[j]

            audio_energy = torch.sum(audio[i, : lengths[i]] ** 2) / lengths[i]
            noise_energy = torch.sum(mixed[: lengths[i]] ** 2) / lengths[i]
            scale = 0
            if noise_energy > 0:
                scale = math.sqrt(audio_energy / (10 ** (energy_db / 10) * noise_energy))
            noise[i] = scale * mixed
            noise_len[i] = lengths[i]
        return AudioNoiseBatch(
            sample_id=batch.sample_id,
            audio=batch.audio,
            audio_len=batch.audio_len,
            noise=noise,
            noise_len=noise_len,
            noisy_audio=batch.audio + noise,
            noisy_audio_len=noise_len,
        )

    @staticmethod
    def _noise_segments(i: int, batch: AudioNoiseBatch, segment_lens: list[int]) -> list[Tensor]:
        """Consecutive pieces of the item's own noise, tiled to the batch length."""
        total = batch.audio.size(1)
        tiled = _fit(_tile(batch.noise[i], batch.noise_len[i], total), total)
        starts = [sum(segment_lens[:k]) for k in range(len(segment_lens))]
        return [tiled[s : s + n] for s, n in zip(starts, segment_lens, strict=True)]

    @staticmethod
    def _speech_segments(
        i: int, batch: AudioNoiseBatch, segment_lens: list[int], num_speakers: int
    ) -> list[Tensor]:
        """Random pieces of other utterances of the batch, one speaker after the other."""
        audio, lengths = batch.audio, batch.audio_len
        others = [x for x in range(audio.size(0)) if x != i]
        speakers = random.sample(others, k=min(num_speakers, audio.size(0) - 1))
        segments, sid = [], 0
        for seg_len in segment_lens:
            bid = speakers[sid]
            if seg_len > lengths[bid]:
                segments.append(_fit(_tile(audio[bid], lengths[bid], seg_len), seg_len))
            else:
                start = (
                    random.randint(0, lengths[bid] - seg_len - 1) if lengths[bid] > seg_len else 0
                )
                segments.append(audio[bid][start : start + seg_len].clone())
            sid += 1
            if sid >= len(speakers):
                sid = random.randint(0, len(speakers) - 1)
        return segments
