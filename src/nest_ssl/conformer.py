"""FastConformer encoder: subsampling, relative positional encoding and Conformer layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from nest_ssl.attention import RelPositionalEncoding, RelPositionMultiHeadAttention
from nest_ssl.subsampling import ConvSubsampling


class FeedForward(nn.Module):
    """linear1 -> activation -> dropout -> linear2 (the activation instance is shared)."""

    def __init__(
        self, d_model: int, d_ff: int, dropout: float, activation: nn.Module, use_bias: bool
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.activation = activation
        self.dropout = nn.Dropout(p=dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class PaddedConv1d(nn.Conv1d):
    """Conv1d with explicit (left, right) zero padding applied by F.pad before the convolution."""

    def __init__(self, channels: int, kernel_size: int, left: int, right: int, use_bias: bool):
        super().__init__(
            channels, channels, kernel_size, stride=1, padding=0, groups=channels, bias=use_bias
        )
        self.left, self.right = left, right

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("convolution caches (streaming) are not supported")
        return super().forward(nn.functional.pad(x, pad=(self.left, self.right)))


class ConvModule(nn.Module):
    """Pointwise conv, GLU, zero padding frames, depthwise conv, BatchNorm, SiLU, pointwise conv."""

    def __init__(self, d_model: int, kernel_size: int, context: tuple[int, int], use_bias: bool):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, d_model * 2, kernel_size=1, bias=use_bias)
        self.depthwise_conv = PaddedConv1d(d_model, kernel_size, context[0], context[1], use_bias)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, kernel_size=1, bias=use_bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, cache=None):
        x = nn.functional.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)  # (B, D, T)
        if pad_mask is not None:
            x = x.masked_fill(pad_mask.unsqueeze(1), 0.0)
        x = self.depthwise_conv(x, cache=cache)
        x = self.pointwise_conv2(self.activation(self.batch_norm(x)))
        return x.transpose(1, 2)


class ConformerLayer(nn.Module):
    """x + FF/2 -> + attention -> + conv -> + FF/2 -> LayerNorm (macaron layout)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_heads: int,
        kernel_size: int,
        context: tuple[int, int],
        dropout: float,
        dropout_att: float,
        use_bias: bool,
        ff_activation: nn.Module,
    ):
        super().__init__()
        self.fc_factor = 0.5
        # construction order (ff1, conv, attention, ff2) fixes the RNG draws and parameter order
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = FeedForward(d_model, d_ff, dropout, ff_activation, use_bias)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConvModule(d_model, kernel_size, context, use_bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = RelPositionMultiHeadAttention(n_heads, d_model, dropout_att, use_bias)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = FeedForward(d_model, d_ff, dropout, ff_activation, use_bias)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(
        self,
        x,
        att_mask=None,
        pos_emb=None,
        pad_mask=None,
        cache_last_channel=None,
        cache_last_time=None,
    ):
        if cache_last_channel is not None or cache_last_time is not None:
            raise ValueError("layer caches (streaming) are not supported")
        res = x
        h = self.feed_forward1(self.norm_feed_forward1(res))
        res = res + self.dropout(h) * self.fc_factor
        h = self.norm_self_att(res)
        h = self.self_attn(query=h, key=h, value=h, mask=att_mask, pos_emb=pos_emb, cache=None)
        res = res + self.dropout(h)
        h = self.conv(self.norm_conv(res), pad_mask=pad_mask, cache=None)
        res = res + self.dropout(h)
        h = self.feed_forward2(self.norm_feed_forward2(res))
        res = res + self.dropout(h) * self.fc_factor
        return self.norm_out(res)


class ConformerEncoder(nn.Module):
    """(B, feat_in, T) features and lengths -> (B, d_model, T/factor) and lengths (int64)."""

    def __init__(
        self,
        feat_in: int,
        n_layers: int,
        d_model: int,
        subsampling_factor: int,
        subsampling_conv_channels: int,
        ff_expansion_factor: int,
        n_heads: int,
        xscaling: bool,
        pos_emb_max_len: int,
        conv_kernel_size: int,
        conv_context: tuple[int, int],
        dropout: float,
        dropout_pre_encoder: float,
        dropout_emb: float,
        dropout_att: float,
        use_bias: bool,
    ):
        super().__init__()
        self.feat_in, self.d_model = feat_in, d_model
        channels = d_model if subsampling_conv_channels == -1 else subsampling_conv_channels
        self.pre_encode = ConvSubsampling(subsampling_factor, feat_in, d_model, channels)
        self.pos_enc = RelPositionalEncoding(
            d_model, dropout_pre_encoder, math.sqrt(d_model) if xscaling else None, dropout_emb
        )
        ff_activation = nn.SiLU()  # one instance for every feed-forward block, as in NeMo
        self.layers = nn.ModuleList(
            ConformerLayer(
                d_model,
                d_model * ff_expansion_factor,
                n_heads,
                conv_kernel_size,
                conv_context,
                dropout,
                dropout_att,
                use_bias,
                ff_activation,
            )
            for _ in range(n_layers)
        )
        self.set_max_audio_length(pos_emb_max_len)

    def set_max_audio_length(self, max_audio_length: int) -> None:
        """Positional table for ``max_audio_length`` feature frames, on the parameters' device."""
        self.max_audio_length = max_audio_length
        p = next(self.parameters())
        self.pos_enc.extend_pe(max_audio_length, p.device, p.dtype)

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor):
        if audio_signal.shape[-2] != self.feat_in:
            raise ValueError(
                f"encoder input must be (B, {self.feat_in}, T), got {tuple(audio_signal.shape)}"
            )
        t_feat = audio_signal.size(2)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            longest = torch.tensor([t_feat], dtype=torch.float32, device=audio_signal.device)
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
            t_feat = longest.int().item()
        if t_feat > self.max_audio_length:
            self.set_max_audio_length(t_feat)
        x, length = self.pre_encode(x=torch.transpose(audio_signal, 1, 2), lengths=length)
        length = length.to(torch.int64)
        t = x.size(1)
        x, pos_emb = self.pos_enc(x=x, cache_len=0)
        valid = torch.arange(0, t, device=x.device).expand(length.size(0), -1) < length.unsqueeze(
            -1
        )
        pair = valid.unsqueeze(1).repeat([1, t, 1])
        att_mask = ~torch.logical_and(pair, pair.transpose(1, 2))  # (B, T, T), True = masked
        pad_mask = ~valid  # (B, T)
        for layer in self.layers:
            x = layer(
                x=x,
                att_mask=att_mask,
                pos_emb=pos_emb,
                pad_mask=pad_mask,
                cache_last_channel=None,
                cache_last_time=None,
            )
        return torch.transpose(x, 1, 2), length.to(dtype=torch.int64)
