"""Mutant ports of nest_ssl: copies of the port that differ from it in one known place each.

A third-party port differs from NeMo the way these mutants differ from nest_ssl: a mask dropped in
a parent's own code, a scale moved, an off-by-one length, a dropout added, skipped or drawn by
another algorithm, sub-blocks in another order, another construction order, a fused or transposed
weight, renamed or extra arguments, wrappers, layouts changed at module boundaries. Each mutant
says which place of the *reference* (nest_ssl, i.e. NeMo's module call names) a perfect comparison
must name, and with which class, so tests can check that the compare localises exactly that place.

    with applied(["conv_no_pad_mask"]):
        model = NestModel(cfg)          # or NestPretraining(cfg, trainer): any NestModel built here

    model = build_model(["conv_no_pad_mask", "attn_arg_names"], seed=42)   # the tiny model
    step = run_step(model, seed=0)      # outputs, loss, parameter gradients (and module calls)

    PYTHONPATH=src python tests/mutants.py conv_no_pad_mask,fused_qkv --config-path config ...
                                        # scripts/capture_nest.py's capture of that mutant

``applied(names)`` patches nest_ssl only while a model is constructed: ``NestModel.__init__`` runs
as usual (under the construction-order patches of the init mutants) and then mutates the new
model: a module touched by a mutant gets the mutant's variant of its class (a subclass with the
same class name whose forward checks the instance's ``_mutants`` tags) or is replaced by another
module (a fused projection, a transposed linear, a wrapper). A model built inside the context thus
keeps its mutations outside it, and any model built outside is the plain port. Every patched
attribute is saved and restored on exit: nest_ssl is left exactly as before. Mutants combine:
``applied`` takes any list of them.

Name maps follow the project's name-map YAML schema (``exact``, ``regex``, ``ignore``) plus
``transforms``: rules ``{match: REGEX, split: {dim: D, into: [TEMPLATES]}}`` (one candidate tensor
cut into equal parts along D, part i named by ``re.sub(match, TEMPLATES[i], name)``) and ``{match:
REGEX, transpose: [PERMUTATION]}`` (the candidate tensor permuted into the reference layout).
Transforms match candidate names (the first full match wins); a split's templates give reference
names, a transposed tensor is then renamed like any name; ``ignore`` applies to the final names
(``to_reference`` implements this reading, the one of ``nestalign.namemap``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import nest_ssl.model as nest_model
from nest_ssl.attention import MASK_FILL, RelPositionMultiHeadAttention
from nest_ssl.conformer import ConformerEncoder, ConformerLayer, ConvModule, FeedForward
from nest_ssl.features import MelPreprocessor
from nest_ssl.model import NestModel
from nest_ssl.quantizer import RandomProjectionQuantizer
from nest_ssl.subsampling import ConvSubsampling

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_NAMES = ("log_probs", "encoded_len", "masks", "tokens")

# Clip lengths of the test batch (samples at 16 kHz): 150 and 120 feature frames. 120 is a multiple
# of the subsampling factor 8, where ``length_off_by_one`` differs from NeMo's ceil(L / 8).
CLIP_SAMPLES = (24000, 19200)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutant:
    """One known difference from nest_ssl.

    kind: "code" (the numbers change) or "neutral" (the same numbers bit for bit on the CPU; only
    names, signatures, structure or layout differ).
    expected: what a perfect localiser reports, in reference names: a module call key
    (``encoder.layers.0.self_attn.dropout#0``), a glue region (``glue in PARENT before CHILD#K``),
    or a module path (init and fp-noise mutants); None when nothing but naming differs.
    expected_class: "code", "glue", "missing", "order", "random algorithm", "init", "fp noise",
    "layout", or None.
    """

    name: str
    kind: str
    expected: str | None
    expected_class: str | None
    name_map: dict[str, Any] | None
    doc: str
    detail: str = ""
    mutate: Callable[[NestModel], None] | None = None  # runs on a freshly built model
    setup: Callable[[_Patcher], None] | None = None  # construction-time patches (init mutants)
    stage: int = 0  # mutate order: wrappers last, after the modules they wrap were mutated


MUTANTS: dict[str, Mutant] = {}


def _register(**kwargs: Any) -> None:
    m = Mutant(**kwargs)
    if m.kind not in ("code", "neutral"):
        raise ValueError(f"mutant {m.name}: kind must be code or neutral")
    MUTANTS[m.name] = m


def code_mutants() -> list[str]:
    return [n for n, m in MUTANTS.items() if m.kind == "code"]


def neutral_mutants() -> list[str]:
    return [n for n, m in MUTANTS.items() if m.kind == "neutral"]


# --------------------------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------------------------
_MISSING = object()


class _Patcher:
    """setattr with the original saved (from the object's own __dict__), restored in reverse."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def original(self, obj: Any, attr: str) -> Any:
        for o, a, value in self._saved:
            if o is obj and a == attr:
                return value
        return getattr(obj, attr)

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self._saved.append((obj, attr, vars(obj).get(attr, _MISSING)))
        setattr(obj, attr, value)

    def restore(self) -> None:
        while self._saved:
            obj, attr, value = self._saved.pop()
            if value is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)


class _State:
    active: tuple[str, ...] | None = None
    build: dict[str, Any] = {}
    layer_index = 0


_STATE = _State()


@contextlib.contextmanager
def applied(names: list[str] | tuple[str, ...]) -> Iterator[None]:
    """Every NestModel built inside carries the named mutants (see the module docstring)."""
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        raise KeyError(f"unknown mutants {unknown}; known: {sorted(MUTANTS)}")
    if _STATE.active is not None:
        raise RuntimeError("applied() does not nest: pass all mutants in one list")
    patcher = _Patcher()
    original_init = vars(NestModel)["__init__"]

    @functools.wraps(original_init)
    def init(self, cfg):
        _STATE.build = {"encoder": None, "decoders": 0}
        original_init(self, cfg)
        _mutate(self, names)

    patcher.set(NestModel, "__init__", init)
    for n in names:
        if MUTANTS[n].setup is not None:
            MUTANTS[n].setup(patcher)
    _STATE.active = names
    try:
        yield
    finally:
        _STATE.active = None
        _STATE.build = {}
        patcher.restore()


def _mutate(model: NestModel, names: tuple[str, ...]) -> None:
    for m in sorted((MUTANTS[n] for n in names), key=lambda m: m.stage):
        if m.mutate is not None:
            m.mutate(model)
    for module in model.modules():
        if "_mutants" in vars(module) and type(module) in _BASES:
            module.__class__ = _variant(module)
    model._mutant_names = names


def _tag(module: nn.Module, name: str) -> None:
    """Mark ``module`` as mutated by ``name``; its class becomes the variant at the end."""
    vars(module)["_mutants"] = vars(module).get("_mutants", frozenset()) | {name}


def _on(module: nn.Module, name: str) -> bool:
    return name in vars(module).get("_mutants", ())


def _replace_child(parent: nn.Module, old: str, new: str, module: nn.Module | None) -> None:
    """Put ``module`` under name ``new`` in the slot of child ``old`` (None: drop ``old``)."""
    items = list(parent._modules.items())
    parent._modules.clear()
    for key, value in items:
        if key != old:
            parent._modules[key] = value
        elif module is not None:
            parent._modules[new] = module


def _layers(model: NestModel, which: list[int] | None = None) -> list[ConformerLayer]:
    layers = list(model.encoder.layers)
    return layers if which is None else [layers[i] for i in which]


# --------------------------------------------------------------------------------------------
# variants of the port's classes (same class names, so recorded module types do not change)
# --------------------------------------------------------------------------------------------
class _FeedForward(FeedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.linear1(x))
        if not _on(self, "skip_dropout"):
            h = self.dropout(h)
        return self.linear2(h)


class _FeedForwardExtra(_FeedForward):
    def forward(self, x: torch.Tensor, cache=None, extra=None) -> torch.Tensor:
        if cache is not None or extra is not None:
            raise ValueError("cache/extra must be None")
        return super().forward(x)


class _ConvModule(ConvModule):
    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, cache=None):
        x = nn.functional.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)  # (B, D, T)
        if pad_mask is not None and not _on(self, "conv_no_pad_mask"):
            x = x.masked_fill(pad_mask.unsqueeze(1), 0.0)
        if _on(self, "no_cache_args"):
            x = self.depthwise_conv(x)
        else:
            x = self.depthwise_conv(x, cache=cache)
        x = self.pointwise_conv2(self.activation(self.batch_norm(x)))
        return x if _on(self, "conv_bdt_output") else x.transpose(1, 2)


class _ConformerLayer(ConformerLayer):
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
        if _on(self, "ff_scale_moved"):
            h = self._ff(self.feed_forward1, self.norm_feed_forward1(res) * self.fc_factor)
            res = res + self.dropout(h)
        else:
            h = self._ff(self.feed_forward1, self.norm_feed_forward1(res))
            res = res + self.dropout(h) * self.fc_factor
        if _on(self, "conv_before_attention"):
            res = self._attention(self._conv(res, pad_mask), att_mask, pos_emb)
        else:
            res = self._conv(self._attention(res, att_mask, pos_emb), pad_mask)
        h = self._ff(self.feed_forward2, self.norm_feed_forward2(res))
        res = res + self.dropout(h) * self.fc_factor
        out = self.norm_out(res)
        if _on(self, "identity_module"):
            out = self.post_identity(out)
        return out

    def _ff(self, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if _on(self, "extra_none_args"):
            return ff(x, cache=None, extra=None)
        return ff(x)

    def _attention(self, res, att_mask, pos_emb):
        h = self.norm_self_att(res)
        names = ("q", "k", "v") if _on(self, "attn_arg_names") else ("query", "key", "value")
        kwargs: dict[str, Any] = dict(zip(names, (h, h, h), strict=True))
        kwargs.update(mask=None if _on(self, "attn_no_mask") else att_mask, pos_emb=pos_emb)
        if not _on(self, "no_cache_args"):
            kwargs["cache"] = None
        h = self.self_attn(**kwargs)
        return res + self.dropout(h)

    def _conv(self, res, pad_mask):
        if _on(self, "no_cache_args"):
            h = self.conv(self.norm_conv(res), pad_mask=pad_mask)
        else:
            h = self.conv(self.norm_conv(res), pad_mask=pad_mask, cache=None)
        if _on(self, "conv_bdt_output"):
            h = h.transpose(1, 2)
        return res + self.dropout(h)


class _Attention(RelPositionMultiHeadAttention):
    def forward(self, query, key, value, mask, pos_emb, cache=None):
        return self._run(query, key, value, mask, pos_emb, cache)

    def _run(self, query, key, value, mask, pos_emb, cache):
        if cache is not None:
            raise ValueError("attention caches (streaming) are not supported")
        b = query.size(0)
        if _on(self, "fused_qkv"):
            if not (query is key and key is value):
                raise ValueError("the fused projection needs query is key is value")
            q, k, v = self.linear_qkv(query).chunk(3, dim=-1)
            q = q.reshape(b, -1, self.h, self.d_k)
            k = k.reshape(b, -1, self.h, self.d_k).transpose(1, 2)
            v = v.reshape(b, -1, self.h, self.d_k).transpose(1, 2)
        else:
            q = self.linear_q(query).view(b, -1, self.h, self.d_k)  # (B, T, H, d_k)
            k = self.linear_k(key).view(b, -1, self.h, self.d_k).transpose(1, 2)
            v = self.linear_v(value).view(b, -1, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))
        ac = torch.matmul(q_u, k.transpose(-2, -1))
        scores = (ac + bd[:, :, :, : ac.size(-1)]) / self.s_d_k
        if mask is not None:
            m = mask.unsqueeze(1)
            probs = torch.softmax(scores.masked_fill(m, -MASK_FILL), dim=-1).masked_fill(m, 0.0)
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.dropout(probs), v)
        out = out.transpose(1, 2).reshape(b, -1, self.h * self.d_k)
        if _on(self, "extra_dropout"):
            out = F.dropout(out, p=self.dropout.p, training=self.training)
        return self.linear_out(out)


class _AttentionQKVNames(_Attention):
    def forward(self, q, k, v, mask, pos_emb, cache=None):
        return self._run(q, k, v, mask, pos_emb, cache)


class _ConvSubsampling(ConvSubsampling):
    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        if _on(self, "subsampling_bft_input"):
            x = x.transpose(1, 2)  # (B, F, T) -> (B, T, F)
        lengths_in = lengths
        if torch.numel(x) > self.split_above:
            x, lengths = self._conv_in_chunks(x, lengths)
        else:
            x, lengths = self.conv(x, lengths)
        if _on(self, "length_off_by_one"):
            lengths = torch.div(lengths_in, 2**self.repeats, rounding_mode="floor").long() + 1
        b, c, t, f = x.size()
        return self.out(x.transpose(1, 2).reshape(b, t, -1)), lengths


class _ConformerEncoder(ConformerEncoder):
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
        if _on(self, "subsampling_bft_input"):
            x, length = self.pre_encode(x=audio_signal, lengths=length)
        else:
            x, length = self.pre_encode(x=torch.transpose(audio_signal, 1, 2), lengths=length)
        length = length.to(torch.int64)
        t = x.size(1)
        x, pos_emb = self.pos_enc(x=x, cache_len=0)
        if _on(self, "pos_emb_expand"):
            pos_emb = pos_emb.expand(x.size(0), -1, -1)
        valid = torch.arange(0, t, device=x.device).expand(length.size(0), -1) < length.unsqueeze(
            -1
        )
        pair = valid.unsqueeze(1).repeat([1, t, 1])
        att_mask = ~torch.logical_and(pair, pair.transpose(1, 2))
        pad_mask = ~valid
        for layer in self.layers:
            if _on(self, "no_cache_args"):
                x = layer(x=x, att_mask=att_mask, pos_emb=pos_emb, pad_mask=pad_mask)
            else:
                x = layer(
                    x=x,
                    att_mask=att_mask,
                    pos_emb=pos_emb,
                    pad_mask=pad_mask,
                    cache_last_channel=None,
                    cache_last_time=None,
                )
        return torch.transpose(x, 1, 2), length.to(dtype=torch.int64)


class _MelPreprocessor(MelPreprocessor):
    """Runs with autograd on; only the featurizer call is under torch.no_grad()."""

    def forward(self, input_signal: torch.Tensor, length: torch.Tensor):
        with torch.no_grad():
            feats, feat_len = self.featurizer(input_signal.to(torch.float32), length)
        return feats.to(self.dtype_sentinel_tensor.dtype), feat_len


class _RandomProjectionQuantizer(RandomProjectionQuantizer):
    """The frozen quantizer's own forward runs under torch.no_grad()."""

    def forward(self, input_signal: torch.Tensor):
        with torch.no_grad():
            return super().forward(input_signal)


class _RandDropout(nn.Dropout):
    """Inverted dropout with the same distribution, drawn with rand_like instead of bernoulli_."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) > self.p) / (1 - self.p)


class TransposedLinear(nn.Module):
    """A Linear whose weight is stored [in, out]: ``F.linear(x, W.t(), b)`` (the port's addmm,
    bit for bit), or with ``matmul`` the plain ``x @ W + b`` (rounds the bias addition apart)."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, matmul: bool):
        super().__init__()
        self.weight = nn.Parameter(weight_t)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.matmul = matmul

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.matmul:
            return F.linear(input, self.weight.t(), self.bias)
        out = input @ self.weight
        return out if self.bias is None else out + self.bias


class SubsamplingWrapper(nn.Module):
    """An extra container: the original subsampling is its child ``inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        return self.inner(x=x, lengths=lengths)


for _cls, _base in (
    (_FeedForward, FeedForward),
    (_FeedForwardExtra, FeedForward),
    (_ConvModule, ConvModule),
    (_ConformerLayer, ConformerLayer),
    (_Attention, RelPositionMultiHeadAttention),
    (_AttentionQKVNames, RelPositionMultiHeadAttention),
    (_ConvSubsampling, ConvSubsampling),
    (_ConformerEncoder, ConformerEncoder),
    (_MelPreprocessor, MelPreprocessor),
    (_RandomProjectionQuantizer, RandomProjectionQuantizer),
    (_RandDropout, nn.Dropout),
):
    _cls.__name__ = _cls.__qualname__ = _base.__name__

_BASES = (
    FeedForward,
    ConvModule,
    ConformerLayer,
    RelPositionMultiHeadAttention,
    ConvSubsampling,
    ConformerEncoder,
    MelPreprocessor,
    RandomProjectionQuantizer,
    nn.Dropout,
)


def _variant(module: nn.Module) -> type:
    t = type(module)
    if t is RelPositionMultiHeadAttention:
        return _AttentionQKVNames if _on(module, "attn_arg_names") else _Attention
    if t is FeedForward:
        return _FeedForwardExtra if _on(module, "extra_none_args") else _FeedForward
    return {
        ConvModule: _ConvModule,
        ConformerLayer: _ConformerLayer,
        ConvSubsampling: _ConvSubsampling,
        ConformerEncoder: _ConformerEncoder,
        MelPreprocessor: _MelPreprocessor,
        RandomProjectionQuantizer: _RandomProjectionQuantizer,
        nn.Dropout: _RandDropout,
    }[t]


# --------------------------------------------------------------------------------------------
# the mutations
# --------------------------------------------------------------------------------------------
def _tagger(name: str, paths: Callable[[NestModel], list[nn.Module]]) -> Callable:
    def mutate(model: NestModel) -> None:
        for module in paths(model):
            _tag(module, name)

    return mutate


def _fuse_qkv(model: NestModel) -> None:
    """linear_q/k/v -> one linear_qkv [3D, D] in linear_q's slot, with the same initial values."""
    for layer in _layers(model):
        a = layer.self_attn
        q, k, v = a.linear_q, a.linear_k, a.linear_v
        fused = torch.nn.utils.skip_init(
            nn.Linear,
            q.in_features,
            3 * q.out_features,
            bias=q.bias is not None,
            device=q.weight.device,
            dtype=q.weight.dtype,
        )  # no random draw: the initial values are NeMo's q, k, v
        with torch.no_grad():
            fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        _replace_child(a, "linear_q", "linear_qkv", fused)
        _replace_child(a, "linear_k", "linear_k", None)
        _replace_child(a, "linear_v", "linear_v", None)
        _tag(a, "fused_qkv")


def _transposer(matmul: bool) -> Callable[[NestModel], None]:
    def mutate(model: NestModel) -> None:
        sub = model.encoder.pre_encode
        old = sub.out
        with torch.no_grad():
            weight_t = old.weight.detach().t().contiguous()
            bias = None if old.bias is None else old.bias.detach().clone()
        _replace_child(sub, "out", "out", TransposedLinear(weight_t, bias, matmul))

    return mutate


def _wrap_pre_encode(model: NestModel) -> None:
    model.encoder.pre_encode = SubsamplingWrapper(model.encoder.pre_encode)  # keeps the slot


def _add_identity(model: NestModel) -> None:
    layer = _layers(model, [0])[0]
    layer.post_identity = nn.Identity()
    _tag(layer, "identity_module")


def _setup_skip_throwaway(patcher: _Patcher) -> None:
    """build_encoder/build_decoder as NestModel.__init__ calls them: the first encoder is kept
    (the second call returns it again) and the throw-away decoder is never built."""
    build_encoder = patcher.original(nest_model, "build_encoder")
    build_decoder = patcher.original(nest_model, "build_decoder")

    def encoder_once(c):
        if _STATE.build.get("encoder") is None:
            _STATE.build["encoder"] = build_encoder(c)
        return _STATE.build["encoder"]

    def decoder_not_first(c):
        _STATE.build["decoders"] = _STATE.build.get("decoders", 0) + 1
        return None if _STATE.build["decoders"] == 1 else build_decoder(c)

    patcher.set(nest_model, "build_encoder", encoder_once)
    patcher.set(nest_model, "build_decoder", decoder_not_first)


def _setup_attention_before_conv(patcher: _Patcher) -> None:
    """Layer 1 of every encoder creates its attention before its conv module (registration order
    unchanged: the state_dict keys and order are the port's, only the initial values move)."""
    encoder_init = patcher.original(ConformerEncoder, "__init__")
    layer_init = patcher.original(ConformerLayer, "__init__")

    @functools.wraps(encoder_init)
    def counting_encoder_init(self, *args, **kwargs):
        _STATE.layer_index = 0
        encoder_init(self, *args, **kwargs)

    @functools.wraps(layer_init)
    def init(
        self,
        d_model,
        d_ff,
        n_heads,
        kernel_size,
        context,
        dropout,
        dropout_att,
        use_bias,
        ff_activation,
    ):
        index = _STATE.layer_index
        _STATE.layer_index += 1
        if index != 1:
            layer_init(
                self,
                d_model,
                d_ff,
                n_heads,
                kernel_size,
                context,
                dropout,
                dropout_att,
                use_bias,
                ff_activation,
            )
            return
        nn.Module.__init__(self)
        self.fc_factor = 0.5
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = FeedForward(d_model, d_ff, dropout, ff_activation, use_bias)
        attention = RelPositionMultiHeadAttention(n_heads, d_model, dropout_att, use_bias)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConvModule(d_model, kernel_size, context, use_bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = attention
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = FeedForward(d_model, d_ff, dropout, ff_activation, use_bias)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    patcher.set(ConformerEncoder, "__init__", counting_encoder_init)
    patcher.set(ConformerLayer, "__init__", init)


L0, L1 = "encoder.layers.0", "encoder.layers.1"
_TRANSPOSE_OUT = {
    # (?:.inner)?: the rule still holds when wrapped_pre_encode wraps the subsampling
    "transforms": [
        {"match": r"^encoder\.pre_encode(?:\.inner)?\.out\.weight$", "transpose": [1, 0]}
    ]
}

# ---- code mutants ----------------------------------------------------------------------------
_register(
    name="conv_no_pad_mask",
    kind="code",
    expected=f"glue in {L1}.conv before {L1}.conv.depthwise_conv#0",
    expected_class="glue",
    name_map=None,
    doc="layer 1's ConvModule skips masked_fill(pad_mask) between the GLU and depthwise_conv",
    mutate=_tagger("conv_no_pad_mask", lambda m: [_layers(m, [1])[0].conv]),
)
_register(
    name="attn_no_mask",
    kind="code",
    expected=f"glue in {L0} before {L0}.self_attn#0",
    expected_class="glue",
    name_map=None,
    doc="layer 0 calls self_attn with mask=None (no attention mask)",
    detail="the mask input of self_attn#0 is None instead of the (B, T, T) mask",
    mutate=_tagger("attn_no_mask", lambda m: _layers(m, [0])),
)
_register(
    name="ff_scale_moved",
    kind="code",
    expected=f"glue in {L1} before {L1}.feed_forward1#0",
    expected_class="glue",
    name_map=None,
    doc="layer 1 applies fc_factor 0.5 to feed_forward1's input instead of its residual output",
    mutate=_tagger("ff_scale_moved", lambda m: _layers(m, [1])),
)
_register(
    name="length_off_by_one",
    kind="code",
    expected="encoder.pre_encode#0",
    expected_class="code",
    name_map=None,
    doc="the subsampling returns floor(L / 8) + 1 frames instead of ceil(L / 8) (off by one for "
    "L a multiple of 8)",
    detail="only the returned lengths differ (the 120-frame clip: 16 instead of 15); the "
    "subsampled features are equal",
    mutate=_tagger("length_off_by_one", lambda m: [m.encoder.pre_encode]),
)
_register(
    name="extra_dropout",
    kind="code",
    expected=f"glue in {L0}.self_attn before {L0}.self_attn.linear_out#0",
    expected_class="glue",
    name_map=None,
    doc="layer 0's attention adds a functional dropout (p = dropout_att) before linear_out",
    detail="a random op added in the attention's own code: it draws random numbers, so every "
    "later dropout mask differs too",
    mutate=_tagger("extra_dropout", lambda m: [_layers(m, [0])[0].self_attn]),
)
_register(
    name="skip_dropout",
    kind="code",
    expected=f"{L1}.feed_forward1.dropout#0",
    expected_class="missing",
    name_map=None,
    doc="layer 1's feed_forward1 never calls its dropout",
    detail="the reference call has no candidate counterpart; linear2's input differs as the "
    "consequence, and every later dropout mask differs (one random draw fewer)",
    mutate=_tagger("skip_dropout", lambda m: [_layers(m, [1])[0].feed_forward1]),
)
_register(
    name="dropout_rand_algorithm",
    kind="code",
    expected=f"{L0}.self_attn.dropout#0",
    expected_class="random algorithm",
    name_map=None,
    doc="layer 0's attention dropout draws x * (rand_like(x) > p) / (1 - p) instead of "
    "nn.functional.dropout (same distribution, other algorithm)",
    mutate=_tagger("dropout_rand_algorithm", lambda m: [_layers(m, [0])[0].self_attn.dropout]),
)
_register(
    name="conv_before_attention",
    kind="code",
    expected=f"glue in {L0} before {L0}.norm_self_att#0",
    expected_class="order",
    name_map=None,
    doc="layer 0 runs its conv block (norm_conv, conv, dropout) before self-attention",
    detail=f"{L0}.norm_conv#0 and .conv#0 run before .norm_self_att#0 and .self_attn#0: the "
    "candidate's norm_conv#0 input is the reference's norm_self_att#0 input",
    mutate=_tagger("conv_before_attention", lambda m: _layers(m, [0])),
)
_register(
    name="init_skip_throwaway",
    kind="code",
    expected="encoder.pre_encode.out",
    expected_class="init",
    name_map=None,
    doc="NestModel.__init__ skips NeMo's throw-away encoder and decoder (one encoder, built "
    "first, in the same slot)",
    detail="the initial weights differ: every randomly initialised tensor of encoder, quantizer, "
    "mask_processor and decoder (first in state_dict order: encoder.pre_encode.out.weight); "
    "the state_dict keys and order are unchanged",
    setup=_setup_skip_throwaway,
)
_register(
    name="init_attention_before_conv",
    kind="code",
    expected=f"{L1}.conv.pointwise_conv1",
    expected_class="init",
    name_map=None,
    doc="layer 1 constructs its attention before its conv module (registered in the port's order)",
    detail=f"only the initial values of {L1}.conv.* (pointwise/depthwise weights and biases) "
    f"and {L1}.self_attn.linear_* differ; everything drawn later is equal",
    setup=_setup_attention_before_conv,
)
_register(
    name="pos_emb_expand",
    kind="code",
    expected="encoder.layers.1.self_attn.linear_pos",
    expected_class="fp noise",
    name_map=None,
    doc="the encoder expands pos_emb from [1, 2T-1, D] to [B, 2T-1, D] before the layers",
    detail="the forward is equal after broadcasting (layers' pos_emb input and linear_pos "
    "output are [B, ...] instead of [1, ...]); the gradient of every layer's "
    "self_attn.linear_pos.weight differs by fp noise (summed over B*(2T-1) rows at once)",
    mutate=_tagger("pos_emb_expand", lambda m: [m.encoder]),
)
_register(
    name="fused_qkv",
    kind="code",
    expected="encoder.layers.1.norm_self_att",
    expected_class="fp noise",
    name_map={
        "transforms": [
            {
                "match": r"^(encoder\.layers\.\d+\.self_attn)\.linear_qkv\.(weight|bias)$",
                "split": {
                    "dim": 0,
                    "into": [r"\1.linear_q.\2", r"\1.linear_k.\2", r"\1.linear_v.\2"],
                },
            }
        ]
    },
    doc="every attention has one linear_qkv [3D, D] (one matmul, then split) instead of "
    "linear_q, linear_k, linear_v",
    detail="layout: the calls self_attn.linear_q/k/v#0 have no candidate counterpart "
    "(self_attn.linear_qkv#0 instead); the forward is bitwise equal, and so are the weight "
    "gradients after the split rule; the gradient into the attention input is one GEMM "
    "instead of the sum of three, so it differs by fp noise from "
    "encoder.layers.1.norm_self_att#0's output on back to the start of the encoder",
    mutate=_fuse_qkv,
)
_register(
    name="transposed_weight_matmul",
    kind="code",
    expected="encoder.pre_encode.out#0",
    expected_class="fp noise",
    name_map=_TRANSPOSE_OUT,
    doc="encoder.pre_encode.out keeps its weight as [in, out] and computes x @ W + b "
    "(a TransposedLinear)",
    detail="the same initial values after the transpose rule; x @ W + b adds the bias after "
    "the product where addmm starts from it, so encoder.pre_encode.out#0's output differs by "
    "fp noise, and everything after it",
    mutate=_transposer(matmul=True),
)

# ---- neutral mutants ---------------------------------------------------------------------------
_register(
    name="attn_arg_names",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map=None,
    doc="the attention takes q, k, v instead of query, key, value (and the layers pass them so)",
    mutate=_tagger(
        "attn_arg_names", lambda m: [x for la in _layers(m) for x in (la, la.self_attn)]
    ),
)
_register(
    name="extra_none_args",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map=None,
    doc="FeedForward.forward gains cache=None, extra=None, which the layers pass explicitly",
    mutate=_tagger(
        "extra_none_args",
        lambda m: [x for la in _layers(m) for x in (la, la.feed_forward1, la.feed_forward2)],
    ),
)
_register(
    name="no_cache_args",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map=None,
    doc="the NeMo-only cache=None arguments are not passed (layers, self_attn, conv, "
    "depthwise_conv)",
    mutate=_tagger(
        "no_cache_args",
        lambda m: [m.encoder] + [x for la in _layers(m) for x in (la, la.conv)],
    ),
)
_register(
    name="wrapped_pre_encode",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map={"exact": {"encoder.pre_encode.inner": "encoder.pre_encode"}},
    doc="encoder.pre_encode is a wrapper whose child inner is the original subsampling",
    mutate=_wrap_pre_encode,
    stage=1,
)
_register(
    name="identity_module",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map={"ignore": [r"^encoder\.layers\.0\.post_identity$"]},
    doc="layer 0 gains encoder.layers.0.post_identity = nn.Identity(), called on its output",
    mutate=_add_identity,
)
_register(
    name="featurizer_no_grad",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map=None,
    doc="the preprocessor's forward runs with autograd on and puts only its featurizer call "
    "under no_grad (the port decorates the whole preprocessor forward, as NeMo does)",
    detail="invisible in a recording: the preprocessor's hooks run outside its decorator in "
    "the port too, and the featurizer runs under no_grad on both sides",
    mutate=_tagger("featurizer_no_grad", lambda m: [m.preprocessor]),
)
_register(
    name="quantizer_no_grad",
    kind="neutral",
    expected=None,
    expected_class=None,
    name_map=None,
    doc="the frozen quantizer runs its forward under torch.no_grad() on the candidate side only",
    detail="quantizer.proj#0 is recorded without autograd (no gradient slots) where the "
    "reference's has one (None: nothing flows back into a frozen module)",
    mutate=_tagger("quantizer_no_grad", lambda m: [m.quantizer]),
)
_register(
    name="subsampling_bft_input",
    kind="neutral",
    expected="encoder.pre_encode#0",
    expected_class="layout",
    name_map=None,
    doc="the encoder passes [B, F, T] to pre_encode, which transposes first thing inside",
    detail="encoder.pre_encode#0's input x is the transpose of the reference's; all else equal",
    mutate=_tagger("subsampling_bft_input", lambda m: [m.encoder, m.encoder.pre_encode]),
)
_register(
    name="transposed_weight",
    kind="neutral",
    expected="encoder.pre_encode.out",
    expected_class="layout",
    name_map=_TRANSPOSE_OUT,
    doc="encoder.pre_encode.out keeps its weight as [in, out] and computes F.linear(x, W.t(), b)",
    detail="the weight (and its gradient) is the transpose of the reference's; with the "
    "transpose rule everything is bitwise equal",
    mutate=_transposer(matmul=False),
)
_register(
    name="conv_bdt_output",
    kind="neutral",
    expected="encoder.layers.0.conv#0",
    expected_class="layout",
    name_map=None,
    doc="every ConvModule returns [B, D, T] and its layer transposes after it",
    detail="encoder.layers.N.conv#0's output (and its gradient) is the transpose of the "
    "reference's; all else equal",
    mutate=_tagger("conv_bdt_output", lambda m: [x for la in _layers(m) for x in (la, la.conv)]),
)


# --------------------------------------------------------------------------------------------
# name maps (the reading of the schema that tests use)
# --------------------------------------------------------------------------------------------
def _renamed(name_map: dict[str, Any], name: str) -> str:
    """``name`` after the ``exact``, then ``regex`` rules (on the name and its dotted prefixes,
    longest first)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix, rest = ".".join(parts[:cut]), parts[cut:]
        if prefix in name_map.get("exact", {}):
            return ".".join([name_map["exact"][prefix], *rest])
    for cut in range(len(parts), 0, -1):
        prefix, rest = ".".join(parts[:cut]), parts[cut:]
        for pattern, repl in name_map.get("regex", []):
            if re.fullmatch(pattern, prefix):
                return ".".join([re.sub(pattern, repl, prefix, count=1), *rest])
    return name


def map_name(name_map: dict[str, Any] | None, name: str) -> str | None:
    """Reference name of candidate ``name`` (a module, call or tensor name); None when ``ignore``
    drops it. Split transforms are not applied here (they name several tensors)."""
    nm = name_map or {}
    mapped = _renamed(nm, name)
    return None if any(re.fullmatch(p, mapped) for p in nm.get("ignore", [])) else mapped


def combined_name_map(names: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
    """One name map for several mutants (their rules concatenated)."""
    out: dict[str, Any] = {}
    for n in names:
        for key, rules in (MUTANTS[n].name_map or {}).items():
            if key == "exact":
                out.setdefault(key, {}).update(rules)
            else:
                out.setdefault(key, []).extend(rules)
    return out or None


def to_reference(
    name_map: dict[str, Any] | None, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Candidate tensors (state_dict, gradients) under reference names and layouts.

    The first ``transforms`` rule whose ``match`` fully matches the candidate name applies: a
    split gives the parts the names ``match.expand(TEMPLATE)`` (reference names), a transpose
    permutes the tensor, which is then renamed like any name; names no transform matches are
    renamed by ``exact``/``regex``. ``ignore`` drops final names.
    """
    nm = name_map or {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        pieces = [(map_name(nm, name), tensor)]
        for rule in nm.get("transforms", []):
            m = re.fullmatch(rule["match"], name)
            if m is None:
                continue
            if "split" in rule:
                into = rule["split"]["into"]
                chunks = tensor.chunk(len(into), dim=rule["split"]["dim"])
                pieces = [(m.expand(t), c) for t, c in zip(into, chunks, strict=True)]
            elif "transpose" in rule:
                pieces = [(map_name(nm, name), tensor.permute(*rule["transpose"]))]
            else:
                raise ValueError(f"transform rule without split or transpose: {rule}")
            break
        for piece_name, piece in pieces:
            if piece_name is not None and not any(
                re.fullmatch(p, piece_name) for p in nm.get("ignore", [])
            ):
                out[piece_name] = piece
    return out


# --------------------------------------------------------------------------------------------
# the tiny model and one training step
# --------------------------------------------------------------------------------------------
@functools.cache
def _tiny_config():
    from nestalign.runner import load_config

    overrides = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["model_overrides"]
    return load_config(str(ROOT / "config"), "nest_fast-conformer", list(overrides))


def tiny_model_config():
    """The ``model:`` section of the tiny config (a fresh copy)."""
    return copy.deepcopy(_tiny_config().model)


def build_model(names: list[str] | tuple[str, ...] = (), seed: int = 42) -> NestModel:
    """The tiny NestModel (config/config.yaml's model_overrides) built under the mutants."""
    cfg = tiny_model_config()
    with applied(list(names)):
        torch.manual_seed(seed)
        model = NestModel(cfg)
    return model


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two clips (1.5 s and 1.2 s at 16 kHz, zero padded) with noise added; deterministic."""
    g = torch.Generator().manual_seed(seed)
    n = max(CLIP_SAMPLES)
    lengths = torch.tensor(CLIP_SAMPLES, dtype=torch.long)
    pad = torch.arange(n).unsqueeze(0) >= lengths.unsqueeze(1)
    audio = (0.1 * torch.randn(len(CLIP_SAMPLES), n, generator=g)).masked_fill(pad, 0.0)
    noise = (0.05 * torch.randn(len(CLIP_SAMPLES), n, generator=g)).masked_fill(pad, 0.0)
    return {
        "input_signal": audio,
        "input_signal_length": lengths,
        "noise_signal": noise,
        "noise_signal_length": lengths.clone(),
        "noisy_input_signal": audio + noise,
        "noisy_input_signal_length": lengths.clone(),
    }


def run_step(model: NestModel, seed: int = 0, record: bool = False) -> dict[str, Any]:
    """One forward (apply_mask=True) and the MLM loss's backward, as NestPretraining's
    training_step runs them, with the torch generator seeded by ``seed`` first.

    Returns {"outputs": {log_probs, encoded_len, masks, tokens}, "loss", "grads": {parameter:
    gradient}} (detached copies), and "calls" (a LayerRecorder's module calls) when ``record``.
    """
    batch = {k: v.clone() for k, v in make_batch().items()}  # dither writes into the signals
    model.zero_grad(set_to_none=True)
    recorder = None
    if record:
        from nestalign.capture import LayerRecorder

        recorder = LayerRecorder(model)
        recorder.start()
    try:
        torch.manual_seed(seed)
        log_probs, encoded_len, masks, tokens = model(**batch, apply_mask=True)
        loss = model.loss(
            masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len
        )
        loss.backward()
    finally:
        if recorder is not None:
            recorder.stop()
    outputs = dict(zip(OUTPUT_NAMES, (log_probs, encoded_len, masks, tokens), strict=True))
    result: dict[str, Any] = {
        "outputs": {k: v.detach().clone() for k, v in outputs.items()},
        "loss": loss.detach().clone(),
        "grads": {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        },
    }
    if recorder is not None:
        result["calls"] = recorder.calls
    return result


# --------------------------------------------------------------------------------------------
# a reference localiser for the tests: the first place where two recorded steps differ
# --------------------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Bitwise equality of recorded values (tensors: dtype, shape and values; NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a, b) or bool(
            a.is_floating_point() and ((a == b) | (a.isnan() & b.isnan())).all()
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def first_difference(ref_calls: list[dict], cand_calls: list[dict]) -> tuple[str, str] | None:
    """(class, place) of the first forward difference, walking the reference's calls in
    execution order (a call's inputs when it starts, its outputs when it ends):
    ("missing", KEY), ("glue", "glue in PARENT before KEY"), ("code", KEY); None if equal."""
    cand = {f"{c['name']}#{c['call']}": c for c in cand_calls}
    children: dict[int | None, list[int]] = {}
    for i, c in enumerate(ref_calls):
        children.setdefault(c.get("parent_start"), []).append(i)

    def walk(i: int) -> tuple[str, str] | None:
        c = ref_calls[i]
        key = f"{c['name']}#{c['call']}"
        other = cand.get(key)
        if other is None:
            return "missing", key
        if not same(c["inputs"], other["inputs"]):
            parent = c.get("parent")
            return "glue", f"glue in {parent} before {key}" if parent else f"glue before {key}"
        for j in children.get(c["start"], []):
            found = walk(j)
            if found is not None:
                return found
        if not same(c["outputs"], other["outputs"]):
            return "code", key
        return None

    for root in children.get(None, []):
        found = walk(root)
        if found is not None:
            return found
    return None


def first_grad_difference(ref_calls: list[dict], cand_calls: list[dict]) -> str | None:
    """Key of the first call, in backward order (last finished first), whose output gradients
    differ; calls the candidate does not have are passed over."""
    cand = {f"{c['name']}#{c['call']}": c for c in cand_calls}
    for c in sorted(ref_calls, key=lambda c: -c["end"]):
        key = f"{c['name']}#{c['call']}"
        if key in cand and not same(c["grad_outputs"], cand[key]["grad_outputs"]):
            return key
    return None


# --------------------------------------------------------------------------------------------
# capturing a mutant with the project's capture driver
# --------------------------------------------------------------------------------------------
def capture(names: list[str] | tuple[str, ...], argv: list[str]) -> int:
    """scripts/capture_nest.py's capture, with the model built under the mutants."""
    from nest_ssl.training import NestPretraining
    from nestalign.runner import capture_main

    def build(model_cfg, trainer):
        return NestPretraining(cfg=model_cfg, trainer=trainer)

    with applied(list(names)):
        return capture_main(argv, "nest", build, "mutant:" + ",".join(names))


if __name__ == "__main__":
    # PYTHONPATH=src python tests/mutants.py NAME[,NAME...] CAPTURE_ARGS  (capture_nest.py's)
    import sys

    raise SystemExit(capture([n for n in sys.argv[1].split(",") if n], sys.argv[2:]))
