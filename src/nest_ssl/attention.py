"""Relative sinusoidal positional encoding and Transformer-XL style relative-position attention."""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_FILL = 10000.0  # masked scores are set to -MASK_FILL before the softmax


class RelPositionalEncoding(nn.Module):
    """Scales x by sqrt(d_model) (if ``xscale``), returns dropout(x) and the table for relative
    positions T'-1 ... -(T'-1), shape (1, 2T'-1, d_model)."""

    def __init__(
        self, d_model: int, dropout_rate: float, xscale: float | None, dropout_rate_emb: float
    ):
        super().__init__()
        self.d_model, self.xscale = d_model, xscale
        self.dropout = nn.Dropout(p=dropout_rate)
        self.dropout_emb = nn.Dropout(dropout_rate_emb) if dropout_rate_emb > 0 else None

    def extend_pe(self, length: int, device: torch.device, dtype: torch.dtype) -> None:
        """(Re)build the table for ``length`` positions on ``device`` unless it is big enough."""
        if hasattr(self, "pe") and self.pe.size(1) >= 2 * length - 1:
            return
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)
        positions = positions.unsqueeze(1)  # (2n-1, 1)
        pe = torch.zeros(positions.size(0), self.d_model, device=device)
        freqs = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
            * -(math.log(10000.0) / self.d_model)
        )
        pe[:, 0::2] = torch.sin(positions * freqs)
        pe[:, 1::2] = torch.cos(positions * freqs)
        pe = pe.unsqueeze(0).to(dtype)
        if hasattr(self, "pe"):
            self.pe = pe
        else:
            self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor, cache_len: int = 0):
        if self.xscale:
            x = x * self.xscale
        n = x.size(1) + cache_len
        center = self.pe.size(1) // 2 + 1
        pos_emb = self.pe[:, center - n : center + n - 1]
        if self.dropout_emb is not None:
            pos_emb = self.dropout_emb(pos_emb)
        return self.dropout(x), pos_emb


class RelPositionMultiHeadAttention(nn.Module):
    """Multi-head attention with relative positions: scores = (q+u) k^T + shift((q+v) p^T)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, use_bias: bool):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"encoder.d_model={n_feat} is not divisible by n_heads={n_head}")
        self.h, self.d_k = n_head, n_feat // n_head
        self.s_d_k = math.sqrt(self.d_k)
        self.linear_q = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_v = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_out = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T1, P) -> (B, H, T1, P) with row i shifted so column j means distance i - j."""
        b, h, t1, p = x.size()
        x = nn.functional.pad(x, pad=(1, 0)).view(b, h, -1, t1)  # (B, H, P+1, T1)
        return x[:, :, 1:].view(b, h, t1, p)

    def forward(self, query, key, value, mask, pos_emb, cache=None):
        if cache is not None:
            raise ValueError("attention caches (streaming) are not supported")
        b = query.size(0)
        q = self.linear_q(query).view(b, -1, self.h, self.d_k)  # (B, T, H, d_k)
        k = self.linear_k(key).view(b, -1, self.h, self.d_k).transpose(1, 2)  # (B, H, T, d_k)
        v = self.linear_v(value).view(b, -1, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # (B, H, T, 2T-1)
        ac = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
        scores = (ac + bd[:, :, :, : ac.size(-1)]) / self.s_d_k
        if mask is not None:
            m = mask.unsqueeze(1)  # (B, 1, T, T), True = masked
            probs = torch.softmax(scores.masked_fill(m, -MASK_FILL), dim=-1).masked_fill(m, 0.0)
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.dropout(probs), v)  # (B, H, T, d_k)
        return self.linear_out(out.transpose(1, 2).reshape(b, -1, self.h * self.d_k))
