"""Audio loading with soundfile, as NeMo's ``AudioSegment.from_file`` reads a segment.

Integer PCM comes back scaled to [-1, 1) as float32 and float files as they are. The segment
starts at ``int(offset * sr)`` frames and holds ``int(duration * sr)`` frames (the whole rest of the
file when the duration is missing or not positive). There is no resampler: a file whose sample rate
differs from the model's raises :class:`SampleRateError` (NeMo would resample it with librosa).
"""

from __future__ import annotations

import numpy as np
import soundfile as sf


class AudioError(RuntimeError):
    """An audio file cannot be used; the message names the file."""


class SampleRateError(AudioError):
    """The file's sample rate is not the model's (the port does not resample)."""


def load_audio(
    path: str,
    sample_rate: int,
    offset: float | None = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """Mono float32 samples of ``path`` from ``offset`` seconds for ``duration`` seconds."""
    try:
        f = sf.SoundFile(path, "r")
    except Exception as exc:  # libsndfile reports bad files with several exception types
        raise AudioError(f"{path}: cannot open audio file ({exc})") from None
    with f:
        if f.samplerate != sample_rate:
            raise SampleRateError(
                f"{path}: sample rate {f.samplerate} Hz, the model expects {sample_rate} Hz; "
                "this port does not resample, convert the file first"
            )
        if f.channels != 1:
            raise AudioError(f"{path}: {f.channels} channels, only mono audio is supported")
        if offset is not None and offset > 0:
            f.seek(int(offset * f.samplerate))
        if duration is not None and duration > 0:
            return f.read(int(duration * f.samplerate), dtype="float32")
        return f.read(dtype="float32")
