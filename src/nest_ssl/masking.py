"""Random block masking of the (noisy) mel features with a frozen mask embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nest_ssl.quantizer import freeze_


class RandomBlockMasking(nn.Module):
    """Each valid frame starts a ``block_size`` block with probability ``mask_prob`` (may overlap).

    One ``torch.rand(B, T)`` draw per call. Returns the masked features and the 0/1 mask expanded
    to the feature shape.
    """

    def __init__(
        self,
        feat_in: int,
        mask_prob: float,
        block_size: int,
        mask_value: float | None,
        freeze: bool,
    ):
        super().__init__()
        self.mask_prob, self.block_size = mask_prob, block_size
        if mask_value is None:
            self.mask_embedding = nn.Parameter(torch.FloatTensor(feat_in))
            nn.init.normal_(self.mask_embedding, mean=0.0, std=0.1)
        else:
            self.mask_embedding = nn.Parameter(
                torch.ones(feat_in) * mask_value, requires_grad=False
            )
        if freeze:
            freeze_(self)

    def forward(self, input_feats: torch.Tensor, input_lengths: torch.Tensor):
        b, _, t = input_feats.shape
        starts_ok = torch.arange(
            t, device=input_feats.device
        ) + self.block_size <= input_lengths.unsqueeze(1)
        starts = (
            torch.rand(b, t, device=input_feats.device) < self.mask_prob
        ) & starts_ok  # (B, T)
        # frame t is masked iff a block starts in [t - block_size + 1, t]
        padded = F.pad(starts.unsqueeze(1).float(), (self.block_size - 1, 0))
        time_mask = F.max_pool1d(padded, kernel_size=self.block_size, stride=1).bool()  # (B, 1, T)
        masked = torch.where(time_mask, self.mask_embedding.view(1, -1, 1), input_feats)
        return masked, time_mask.to(input_feats.dtype).expand_as(input_feats)
