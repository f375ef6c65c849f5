"""Frozen random-projection quantizer (BEST-RQ): features -> codebook indices (the MLM targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS_PER_CHUNK = 256  # distance rows per chunk; bounds the (rows, K, D, C) float64 temporary


def freeze_(module: nn.Module) -> None:
    """No gradients and eval mode, as NeMo's ``NeuralModule.freeze``."""
    for p in module.parameters():
        p.requires_grad = False
    module.eval()


class RandomProjectionQuantizer(nn.Module):
    """Stack ``combine_time_steps`` frames, project to ``code_dim``, L2-normalise, nearest code.

    ``codebooks`` (num_books, num_classes, code_dim) is float64, so the distances are float64.
    """

    def __init__(
        self,
        feat_in: int,
        code_dim: int,
        num_books: int,
        num_classes: int,
        combine_time_steps: int,
        squeeze_single: bool,
        freeze: bool,
    ):
        super().__init__()
        self.code_dim, self.num_books, self.num_classes = code_dim, num_books, num_classes
        self.combine_time_steps, self.squeeze_single = combine_time_steps, squeeze_single
        self.proj = nn.Linear(feat_in * combine_time_steps, num_books * code_dim, bias=False)
        nn.init.xavier_normal_(self.proj.weight)
        codes = torch.randn(num_books, num_classes, code_dim).double()  # values replaced below
        nn.init.normal_(codes, mean=0, std=1)
        self.codebooks = nn.Parameter(F.normalize(codes, dim=-1))
        if freeze:
            freeze_(self)

    def forward(self, input_signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = input_signal.transpose(1, 2)  # (B, T, D)
        b, t, _ = x.size()
        if self.combine_time_steps > 1:
            t = t // self.combine_time_steps
            x = x.contiguous().reshape(b, t, -1)  # (B, T', D*steps), time-major groups
        z = F.normalize(self.proj(x).view(b, t, self.num_books, self.code_dim), dim=-1)
        codes_t = self.codebooks.transpose(1, 2).unsqueeze(0)  # (1, K, code_dim, C)
        rows = z.reshape(b * t, self.num_books, self.code_dim, 1)
        ids = [
            (chunk - codes_t).norm(dim=-2).argmin(dim=-1)  # float64 distances, (rows, K)
            for chunk in rows.split(ROWS_PER_CHUNK)
        ]
        xid = (
            torch.cat(ids).view(b, t, self.num_books)
            if ids
            else rows.new_zeros((b, t, self.num_books), dtype=torch.long)
        )
        offsets = self.num_classes * torch.arange(self.num_books, device=xid.device)
        flat = (xid + offsets.view(1, 1, -1)).transpose(1, 2).contiguous().view(-1, t)
        xq = F.embedding(flat.view(-1), self.codebooks.view(-1, self.code_dim))
        xq = xq.view(b, t, self.code_dim, self.num_books).transpose(1, 2)  # (B, code_dim, T', K)
        if self.num_books == 1 and self.squeeze_single:
            return xq.squeeze(-1), xid.squeeze(-1)
        return xq, xid
