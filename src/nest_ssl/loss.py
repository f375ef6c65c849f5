"""Masked-token NLL on the encoder frames whose feature frames are mostly masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLMLoss(nn.Module):
    """NLL over frames whose ``combine_time_steps`` mask frames have a mean above the threshold.

    The mean runs over all feature frames of the group, so with 8 frames and threshold 0.8 a frame
    counts when at least 7 of its 8 feature frames are masked. NaN when no frame counts.
    """

    def __init__(self, combine_time_steps: int, mask_threshold: float):
        super().__init__()
        self.nll_loss = nn.NLLLoss()
        self.combine_time_steps, self.mask_threshold = combine_time_steps, mask_threshold

    def forward(
        self,
        decoder_outputs,
        targets,
        decoder_lengths=None,
        target_lengths=None,
        spec_masks=None,
        masks=None,
    ):
        masks = spec_masks if masks is None else masks
        if masks is None:
            raise ValueError("MLMLoss needs spec_masks or masks")
        sel = masks.transpose(1, 2)  # (B, T, D)
        sel = sel.reshape(sel.shape[0], sel.shape[1] // self.combine_time_steps, -1)
        sel = sel.mean(-1) > self.mask_threshold  # (B, T') bool
        picked = decoder_outputs[sel]  # (N, C)
        targets = F.pad(targets, (0, sel.shape[-1] - targets.shape[-1]))
        return torch.mean(self.nll_loss(picked, targets[sel]))


class MultiMLMLoss(nn.Module):
    """Mean of ``MLMLoss`` over the decoders (codebooks)."""

    def __init__(
        self,
        combine_time_steps: int,
        mask_threshold: float,
        num_decoders: int,
        squeeze_single: bool,
    ):
        super().__init__()
        self.num_decoders, self.squeeze_single = num_decoders, squeeze_single
        self.mlm_loss = MLMLoss(combine_time_steps, mask_threshold)

    def forward(self, masks, decoder_outputs, targets, decoder_lengths=None, target_lengths=None):
        if self.squeeze_single and self.num_decoders == 1:
            return self.mlm_loss(
                spec_masks=masks,
                decoder_outputs=decoder_outputs,
                targets=targets,
                decoder_lengths=decoder_lengths,
                target_lengths=target_lengths,
            )
        loss = 0.0
        for i in range(self.num_decoders):
            loss += self.mlm_loss(
                spec_masks=masks,
                decoder_outputs=decoder_outputs[:, :, :, i],
                targets=targets[:, :, i],
                decoder_lengths=decoder_lengths,
                target_lengths=target_lengths,
            )
        return loss / self.num_decoders
