"""Log-mel features: dither, pre-emphasis, STFT, Slaney mel filterbank, log, per-feature norm."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NORM_EPS = 1e-5  # added to the per-feature std


def _hz_to_mel(hz: float) -> float:
    """Slaney mel of one frequency (linear below 1 kHz, logarithmic above), as a float64 scalar."""
    f = np.asanyarray(hz, dtype=np.float64)
    mel = f / (200.0 / 3)
    if f >= 1000.0:
        mel = 1000.0 / (200.0 / 3) + np.log(f / 1000.0) / (np.log(6.4) / 27.0)
    return mel


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of ``_hz_to_mel`` for a float64 vector."""
    hz = (200.0 / 3) * mels
    min_log_mel = 1000.0 / (200.0 / 3)
    log_region = mels >= min_log_mel
    hz[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - min_log_mel))
    return hz


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale, Slaney-normalised mel filterbank (n_mels, 1 + n_fft // 2), float32.

    The triangles are computed in float64 and stored in a float32 array *before* the area
    normalisation, which then runs in float64 and is rounded to float32 again: two roundings,
    exactly as in librosa.filters.mel(norm="slaney", htk=False).
    """
    fft_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(mel_hz)
    ramps = np.subtract.outer(mel_hz, fft_hz)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        rising = -ramps[i] / widths[i]
        falling = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_hz[2 : n_mels + 2] - mel_hz[:n_mels]))[:, np.newaxis]
    return weights


class FilterbankFeatures(nn.Module):
    """Waveform (B, L) -> normalised log-mel (B, n_mels, T), T padded to a multiple of pad_to."""

    def __init__(
        self,
        sample_rate: int,
        win_length: int,
        hop_length: int,
        n_fft: int,
        n_mels: int,
        lowfreq: float,
        highfreq: float | None,
        dither: float,
        preemph: float | None,
        log_guard: float,
        pad_to: int,
        pad_value: float,
    ):
        super().__init__()
        self.win_length, self.hop_length, self.n_fft = win_length, hop_length, n_fft
        self.dither, self.preemph, self.log_guard = dither, preemph, log_guard
        self.pad_to, self.pad_value = pad_to, pad_value
        self.register_buffer("window", torch.hann_window(win_length, periodic=False))
        fb = mel_filterbank(sample_rate, n_fft, n_mels, lowfreq, highfreq or sample_rate / 2)
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float).unsqueeze(0))

    def frame_count(self, seq_len: torch.Tensor) -> torch.Tensor:
        """Number of valid frames for ``seq_len`` samples (center=True STFT)."""
        n = torch.floor_divide(seq_len + self.n_fft // 2 * 2 - self.n_fft, self.hop_length)
        return n.to(dtype=torch.long)

    def forward(self, x: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_frames = self.frame_count(seq_len)
        frames = torch.where(seq_len == 0, torch.zeros_like(n_frames), n_frames)
        if self.training and self.dither > 0:
            x += self.dither * torch.randn_like(x)  # in place on the caller's tensor, like NeMo
        if self.preemph is not None:
            inside = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < seq_len.unsqueeze(1)
            x = torch.cat((x[:, 0].unsqueeze(1), x[:, 1:] - self.preemph * x[:, :-1]), dim=1)
            x = x.masked_fill(~inside, 0.0)
        with torch.amp.autocast(x.device.type, enabled=False):
            spec = torch.stft(
                x,
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.win_length,
                center=True,
                window=self.window.to(dtype=torch.float, device=x.device),
                return_complex=True,
                pad_mode="constant",
            )  # (B, n_fft/2+1, Tf)
        power = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 0).pow(2.0)
        with torch.amp.autocast(power.device.type, enabled=False):
            mel = torch.matmul(self.fb.to(power.dtype), power)  # (B, n_mels, Tf)
        feats = torch.log(mel + self.log_guard)
        feats = normalize_per_feature(feats, frames)
        invalid = torch.arange(feats.size(-1), device=feats.device).repeat(feats.size(0), 1)
        feats = feats.masked_fill((invalid >= frames.unsqueeze(1)).unsqueeze(1), self.pad_value)
        remainder = feats.size(-1) % self.pad_to
        if self.pad_to > 0 and remainder != 0:
            feats = nn.functional.pad(feats, (0, self.pad_to - remainder), value=self.pad_value)
        return feats, frames


def normalize_per_feature(x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (unbiased) std per utterance and mel bin over the valid frames."""
    if torch.cuda.is_available() and torch.any(frames == 1).item():
        raise ValueError("per_feature normalisation got an utterance with one frame (std is NaN)")
    steps = torch.arange(x.shape[2], device=x.device).unsqueeze(0).expand(x.shape[0], x.shape[2])
    valid = steps < frames.unsqueeze(1)  # (B, T)
    count = valid.sum(axis=1)
    mean = torch.where(valid.unsqueeze(1), x, 0.0).sum(axis=2) / count.unsqueeze(1)
    centred = torch.where(valid.unsqueeze(1), x - mean.unsqueeze(2), 0.0)
    std = torch.sqrt(torch.sum(centred**2, axis=2) / (count.unsqueeze(1) - 1.0))
    std = std.masked_fill(std.isnan(), 0.0)
    std += NORM_EPS
    out = (x - mean.unsqueeze(2)) / std.unsqueeze(2)
    out.masked_fill_(~valid.unsqueeze(1), 0.0)
    return out


class MelPreprocessor(nn.Module):
    """The model's ``preprocessor``: runs ``featurizer`` without gradients, in float32."""

    def __init__(self, featurizer: FilterbankFeatures):
        super().__init__()
        self.featurizer = featurizer
        self.register_buffer(
            "dtype_sentinel_tensor", torch.tensor((), dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def forward(self, input_signal: torch.Tensor, length: torch.Tensor):
        feats, feat_len = self.featurizer(input_signal.to(torch.float32), length)
        return feats.to(self.dtype_sentinel_tensor.dtype), feat_len
