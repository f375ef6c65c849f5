"""Depthwise-striding 2-D convolutional subsampling with time masking before every layer."""

from __future__ import annotations

import math

import torch
from torch import nn


class MaskedConvSequential(nn.Sequential):
    """Runs its layers on (B, 1, T, F) and zeroes frames >= the running length before each layer.

    Lengths are tracked as floats: each strided conv maps L -> floor((L + pads - k) / s) + 1.
    """

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1)  # (B, 1, T, F)
        cur = lengths.clone().float()
        mask = _time_mask(x, cur.long())
        for layer in self:
            x = x * mask.unsqueeze(1).expand_as(x)
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
                pad_l, pad_r = layer.padding
                cur = (cur + pad_l + pad_r - layer.kernel_size[0]) // layer.stride[0] + 1
                mask = _time_mask(x, cur.long())
        return x * mask.unsqueeze(1).expand_as(x), cur.long()


def _time_mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, F) mask of x's dtype, 1 where the time index < length."""
    b, _, t, f = x.shape
    valid = torch.arange(t, device=x.device).expand(b, t) < lengths.unsqueeze(1)
    return valid.unsqueeze(-1).expand(b, t, f).to(x.dtype)


def subsampled_length(lengths: torch.Tensor, repeats: int) -> torch.Tensor:
    """Frames after ``repeats`` k=3, s=2, p=1 convolutions (int32, as NeMo computes it)."""
    for _ in range(repeats):
        lengths = torch.floor(torch.div(lengths.to(dtype=torch.float) + (2 - 3), 2) + 1.0)
    return lengths.to(dtype=torch.int)


class ConvSubsampling(nn.Module):
    """(B, T, feat_in) -> (B, T / factor, feat_out) with dw_striding: conv, then (depthwise,
    pointwise) pairs, each followed by the one shared in-place ReLU, then a Linear over C x F."""

    def __init__(self, factor: int, feat_in: int, feat_out: int, channels: int):
        super().__init__()
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"encoder.subsampling_factor must be a power of 2, got {factor}")
        # NeMo runs the convs batch chunk by batch chunk above this many input elements
        self.split_above = 2**31 / channels * 2 * 2
        self.repeats = int(math.log(factor, 2))
        relu = nn.ReLU(True)
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), relu]
        for _ in range(self.repeats - 1):
            layers += [
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1, stride=1, padding=0, groups=1),
                relu,
            ]
        freq_out = int(subsampled_length(torch.tensor(feat_in, dtype=torch.float), self.repeats))
        self.out = nn.Linear(channels * freq_out, feat_out)  # registered before conv, like NeMo
        self.conv = MaskedConvSequential(*layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.numel(x) > self.split_above:
            x, lengths = self._conv_in_chunks(x, lengths)
        else:
            x, lengths = self.conv(x, lengths)
        b, c, t, f = x.size()  # (B, C, T', F')
        return self.out(x.transpose(1, 2).reshape(b, t, -1)), lengths

    def _conv_in_chunks(self, x: torch.Tensor, lengths: torch.Tensor):
        size = x.size(0) // 2 ** math.ceil(math.log(torch.numel(x) / self.split_above, 2))
        if size == 0:
            raise ValueError(f"subsampling input {tuple(x.shape)} is too large to split by batch")
        parts = [
            self.conv(xs, ls)
            for xs, ls in zip(torch.split(x, size, 0), torch.split(lengths, size, 0), strict=True)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
