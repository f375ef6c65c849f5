"""Multi-softmax decoder: 1x1 Conv1d to num_classes * num_decoders logits, log-softmax."""

from __future__ import annotations

import torch
from torch import nn


class MultiSoftmaxDecoder(nn.Module):
    """(B, feat_in, T') -> log-probs (B, T', num_classes, num_decoders)."""

    def __init__(
        self,
        feat_in: int,
        num_classes: int,
        num_decoders: int,
        squeeze_single: bool,
        use_bias: bool,
    ):
        super().__init__()
        self.num_classes, self.num_decoders = num_classes, num_decoders
        self.squeeze_single = squeeze_single
        self.decoder_layers = nn.Sequential(
            nn.Conv1d(feat_in, num_classes * num_decoders, kernel_size=1, bias=use_bias)
        )
        nn.init.xavier_uniform_(self.decoder_layers[0].weight, gain=1.0)

    def forward(self, encoder_output: torch.Tensor) -> torch.Tensor:
        logits = self.decoder_layers(encoder_output).transpose(1, 2)  # (B, T', C*K)
        logits = logits.reshape(
            logits.shape[0], logits.shape[1], self.num_classes, self.num_decoders
        )
        if self.squeeze_single and self.num_decoders == 1:
            logits = logits.squeeze(-1)
        return torch.nn.functional.log_softmax(logits, dim=2)
