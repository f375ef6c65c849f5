"""AudioNoiseDataset: clean utterances paired with a random noise clip, and its collate.

Random draws happen exactly where NeMo makes them, on the same generators: the choice of a noise
clip and of its offset, and the white noise added to a silent clip, use numpy's global RNG in
``__getitem__``; the batch augmentation in the collate uses Python's ``random``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from nest_ssl.audio import SampleRateError, load_audio
from nest_ssl.batch import AudioNoiseBatch, AudioNoiseItem
from nest_ssl.manifest import read_audio_manifests, read_noise_manifests

log = logging.getLogger(__name__)

NOISE_TRIES = 20  # clips tried before falling back to silence
SEGMENT_TRIES = 100  # random offsets tried before keeping an "empty" segment
WHITE_NOISE_DB = (-90, -46)  # level range of the white noise added to a silent clip


def pad_audio(audio: Tensor, min_len: int, mode: str = "repeat") -> Tensor:
    """Tile (``repeat``) or zero-pad (``zero``, or an empty clip) audio up to ``min_len``."""
    if mode not in ("repeat", "zero"):
        raise ValueError(f"pad_audio_mode must be 'repeat' or 'zero', got {mode!r}")
    n = audio.size(0)
    if n >= min_len:
        return audio
    if mode == "repeat" and n > 0:
        return audio.repeat(math.ceil(min_len / n))[:min_len]
    return F.pad(audio, (0, min_len - n))


def _add_white_noise(samples: np.ndarray) -> None:
    level_db = np.random.randint(*WHITE_NOISE_DB, dtype="int32")
    samples += np.random.randn(samples.shape[0]) * (10.0 ** (level_db / 20.0))


def load_noise_audio(
    entry: dict[str, Any], sample_rate: int, max_audio_len: int
) -> tuple[Tensor, Tensor]:
    """A noise segment of at most ``max_audio_len`` samples, zero-padded to it, and its length.

    A clip longer than the audio is read from a random offset, redrawn while the plain sum of its
    samples is not positive; a clip that is silent in the end gets low-level white noise.
    """
    max_dur = max_audio_len / sample_rate
    duration = entry.get("duration")
    offset = entry.get("offset", 0.0)
    path = entry["audio_filepath"]
    if duration is not None and duration > max_dur:
        for _ in range(SEGMENT_TRIES):
            offset = np.random.uniform(0, duration - max_dur)
            samples = load_audio(path, sample_rate, offset, max_dur)
            if sum(samples) > 0:
                break
    else:
        samples = load_audio(path, sample_rate, offset, duration)
    if sum(samples) == 0:
        log.warning("noise clip %s is silent at offset %s: adding white noise", path, offset)
        _add_white_noise(samples)
    noise = torch.tensor(samples, dtype=torch.float)
    noise_len = torch.tensor(noise.size(0)).long()
    if noise.size(0) < max_audio_len:
        noise = F.pad(noise, (0, max_audio_len - noise.size(0)))
    else:
        noise = noise[:max_audio_len]
        noise_len = torch.tensor(max_audio_len).long()
    return noise, noise_len


def sample_noise(
    noise_data: list[dict[str, Any]], sample_rate: int, max_audio_len: int
) -> tuple[Tensor, Tensor]:
    """A random noise clip for an utterance of ``max_audio_len`` samples; silence without clips.

    A clip that fails to load is replaced by another random one, up to 20 times; a clip at the
    wrong sample rate is an error (the port cannot resample it).
    """
    for _ in range(NOISE_TRIES if noise_data else 0):
        entry = noise_data[np.random.randint(len(noise_data))]
        try:
            return load_noise_audio(entry, sample_rate, max_audio_len)
        except SampleRateError:
            raise
        except Exception as exc:  # NeMo retries on any loading error
            log.warning("cannot load noise clip %s (%s), trying another", entry, exc)
    if noise_data:
        log.warning("no noise clip loaded after %d tries: using silence", NOISE_TRIES)
    return torch.zeros(max_audio_len).float(), torch.tensor(max_audio_len).long()


def collate_audio_noise(
    items: list[AudioNoiseItem],
    batch_augmentor: Callable[[AudioNoiseBatch], AudioNoiseBatch] | None,
) -> AudioNoiseBatch:
    """Right-pad audio and noise to the longest audio, then mix (augmentor or plain sum)."""
    max_len = max(item.audio_len for item in items).item()
    audio = [F.pad(x.audio, (0, max_len - x.audio.size(0))) for x in items]
    noise = [F.pad(x.noise, (0, max(0, max_len - x.noise.size(0))))[:max_len] for x in items]
    batch = AudioNoiseBatch(
        audio=torch.stack(audio).float(),
        audio_len=torch.stack([x.audio_len for x in items]).long(),
        noise=torch.stack(noise).float(),
        noise_len=torch.stack([x.noise_len for x in items]).long(),
    )
    if batch_augmentor is not None:
        return batch_augmentor(batch)
    batch.noisy_audio = batch.audio + batch.noise
    batch.noisy_audio_len = batch.audio_len
    return batch


class AudioNoiseDataset(torch.utils.data.Dataset):
    """Manifest utterances padded to at least ``min_audio_len_secs``, each with a noise clip."""

    def __init__(
        self,
        manifest_filepath: str | list[str],
        sample_rate: int,
        noise_manifest: str | list[str] | None = None,
        batch_augmentor: Callable[[AudioNoiseBatch], AudioNoiseBatch] | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
        min_audio_len_secs: float = 1.0,
        pad_audio_mode: str = "repeat",
    ):
        self.entries = read_audio_manifests(manifest_filepath, min_duration, max_duration)
        self.noise_data = read_noise_manifests(noise_manifest)
        self.sample_rate = sample_rate
        self.batch_augmentor = batch_augmentor
        self.min_audio_len_secs = min_audio_len_secs
        self.pad_audio_mode = pad_audio_mode

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> AudioNoiseItem:
        entry = self.entries[index]
        offset = 0 if entry.offset is None else entry.offset
        samples = load_audio(entry.audio_file, self.sample_rate, offset, entry.duration)
        if samples.shape[0] == 0:
            log.warning("audio file %s gave no samples", entry.audio_file)
        audio = pad_audio(
            torch.tensor(samples, dtype=torch.float),
            int(self.min_audio_len_secs * self.sample_rate),
            self.pad_audio_mode,
        )
        audio_len = torch.tensor(audio.shape[0]).long()
        noise, noise_len = sample_noise(self.noise_data, self.sample_rate, audio_len.item())
        return AudioNoiseItem(str(index), audio, audio_len, noise, noise_len)

    def collate_fn(self, items: list[AudioNoiseItem]) -> AudioNoiseBatch:
        return collate_audio_noise(items, self.batch_augmentor)
