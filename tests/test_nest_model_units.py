"""Fast unit tests of the nest model port (no NeMo): structure, counts, masking, loss, config."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nest_ssl import quantizer as quantizer_mod
from nest_ssl.features import mel_filterbank
from nest_ssl.loss import MultiMLMLoss
from nest_ssl.masking import RandomBlockMasking
from nest_ssl.model import NestModel

CONFIG = Path(__file__).resolve().parents[1] / "config" / "nest_fast-conformer.yaml"
TINY = [
    "model.encoder.n_layers=2",
    "model.encoder.d_model=64",
    "model.encoder.n_heads=4",
    "model.encoder.subsampling_conv_channels=64",
]


def model_cfg(overrides: list[str]):
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(overrides))
    OmegaConf.resolve(cfg)
    return cfg.model


@pytest.fixture(scope="module")
def tiny() -> NestModel:
    torch.manual_seed(0)
    return NestModel(model_cfg(TINY))


def expected_entries(n_layers: int, d: int, ch: int, heads: int, classes: int):
    """state_dict layout as NeMo 3.0.0 has it (nest_spec section 4.2), built from the sizes."""
    f = torch.float32
    e = [
        ("preprocessor.featurizer.window", (400,), f),
        ("preprocessor.featurizer.fb", (1, 80, 257), f),
    ]
    e += [
        ("encoder.pre_encode.out.weight", (d, ch * 10), f),
        ("encoder.pre_encode.out.bias", (d,), f),
    ]
    e += [
        ("encoder.pre_encode.conv.0.weight", (ch, 1, 3, 3), f),
        ("encoder.pre_encode.conv.0.bias", (ch,), f),
    ]
    for i in (2, 5):
        e += [(f"encoder.pre_encode.conv.{i}.weight", (ch, 1, 3, 3), f)]
        e += [(f"encoder.pre_encode.conv.{i}.bias", (ch,), f)]
        e += [(f"encoder.pre_encode.conv.{i + 1}.weight", (ch, ch, 1, 1), f)]
        e += [(f"encoder.pre_encode.conv.{i + 1}.bias", (ch,), f)]
    ff = [
        ("linear1.weight", (4 * d, d)),
        ("linear1.bias", (4 * d,)),
        ("linear2.weight", (d, 4 * d)),
        ("linear2.bias", (d,)),
    ]
    for n in range(n_layers):
        p = f"encoder.layers.{n}."
        ln = lambda name, p=p: [(p + name + ".weight", (d,), f), (p + name + ".bias", (d,), f)]  # noqa: E731
        e += ln("norm_feed_forward1") + [(p + "feed_forward1." + k, s, f) for k, s in ff]
        e += ln("norm_conv")
        e += [
            (p + "conv.pointwise_conv1.weight", (2 * d, d, 1), f),
            (p + "conv.pointwise_conv1.bias", (2 * d,), f),
            (p + "conv.depthwise_conv.weight", (d, 1, 9), f),
            (p + "conv.depthwise_conv.bias", (d,), f),
        ]
        e += [
            (p + "conv.batch_norm." + k, (d,), f)
            for k in ("weight", "bias", "running_mean", "running_var")
        ]
        e += [(p + "conv.batch_norm.num_batches_tracked", (), torch.int64)]
        e += [
            (p + "conv.pointwise_conv2.weight", (d, d, 1), f),
            (p + "conv.pointwise_conv2.bias", (d,), f),
        ]
        e += ln("norm_self_att")
        e += [
            (p + "self_attn.pos_bias_u", (heads, d // heads), f),
            (p + "self_attn.pos_bias_v", (heads, d // heads), f),
        ]
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            e += [
                (p + f"self_attn.{lin}.weight", (d, d), f),
                (p + f"self_attn.{lin}.bias", (d,), f),
            ]
        e += [(p + "self_attn.linear_pos.weight", (d, d), f)]
        e += ln("norm_feed_forward2") + [(p + "feed_forward2." + k, s, f) for k, s in ff]
        e += ln("norm_out")
    e += [
        ("quantizer.codebooks", (1, classes, 16), torch.float64),
        ("quantizer.proj.weight", (16, 640), f),
        ("mask_processor.mask_embedding", (80,), f),
        ("decoder.decoder_layers.0.weight", (classes, d, 1), f),
        ("decoder.decoder_layers.0.bias", (classes,), f),
    ]
    return e


def test_state_dict_names_shapes_dtypes_order(tiny):
    got = [(k, tuple(v.shape), v.dtype) for k, v in tiny.state_dict().items()]
    assert got == expected_entries(2, 64, 64, 4, 8192)
    frozen = [n for n, p in tiny.named_parameters() if not p.requires_grad]
    assert frozen == [
        "quantizer.codebooks",
        "quantizer.proj.weight",
        "mask_processor.mask_embedding",
    ]
    assert [n for n, _ in tiny.named_children()] == [
        "preprocessor",
        "encoder",
        "loss",
        "spec_augmentation",
        "quantizer",
        "mask_processor",
        "decoder",
    ]


def test_full_config_counts():
    torch.manual_seed(0)
    model = NestModel(model_cfg([]))
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 113_106_000
    assert sum(p.numel() for p in params.values() if p.requires_grad) == 112_964_608
    assert (len(params), sum(p.requires_grad for p in params.values())) == (646, 643)
    assert len(model.state_dict()) == 699
    got = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    assert got == expected_entries(17, 512, 256, 8, 8192)


def test_shared_parameter_free_modules(tiny):
    conv = tiny.encoder.pre_encode.conv
    assert conv[1] is conv[4] is conv[7] and conv[1].inplace
    acts = {id(m.feed_forward1.activation) for m in tiny.encoder.layers}
    acts |= {id(m.feed_forward2.activation) for m in tiny.encoder.layers}
    assert len(acts) == 1
    assert tiny.encoder.layers[0].conv.activation is not tiny.encoder.layers[1].conv.activation


def test_same_seed_same_weights(tiny):
    torch.manual_seed(0)
    again = NestModel(model_cfg(TINY))
    for (k, a), b in zip(tiny.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not torch.equal(
        tiny.encoder.layers[0].feed_forward1.linear1.weight,
        tiny.encoder.layers[1].feed_forward1.linear1.weight,
    )


def test_model_import_does_not_import_lightning():
    code = (
        "import sys, nest_ssl.model\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric')))"
    )
    env = {**os.environ, "PYTHONPATH": str(CONFIG.parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_pretraining_is_the_model_plus_lightning(tiny):
    from lightning.pytorch import LightningModule

    from nest_ssl.training import NestPretraining

    cfg = model_cfg(TINY)
    for key in ("train_ds", "validation_ds"):
        cfg.pop(key)
    torch.manual_seed(0)
    trained = NestPretraining(cfg)
    assert isinstance(trained, LightningModule) and not isinstance(tiny, LightningModule)
    modules = [(n, type(m)) for n, m in trained.named_modules()]
    assert modules[0] == ("", NestPretraining) and issubclass(NestPretraining, NestModel)
    assert modules[1:] == [(n, type(m)) for n, m in tiny.named_modules()][1:]
    for (k, a), (j, b) in zip(tiny.state_dict().items(), trained.state_dict().items(), strict=True):
        assert k == j and torch.equal(a, b), k


def batch(seconds=(3.0, 2.0)):
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([int(s * 16000) for s in seconds])
    audio = torch.zeros(len(seconds), int(lens.max()))
    for i, n in enumerate(lens.tolist()):
        audio[i, :n] = 0.1 * torch.randn(n, generator=g)
    return audio, lens


def test_forward_shapes_and_lengths(tiny):
    tiny.eval()
    audio, lens = batch()
    torch.manual_seed(3)
    log_probs, enc_len, masks, tokens = tiny(
        input_signal=audio.clone(),
        input_signal_length=lens,
        noisy_input_signal=audio.clone(),
        noisy_input_signal_length=lens,
        apply_mask=True,
    )
    t = math.ceil((1 + 48000 // 160) / 16) * 16  # 301 frames padded to 304
    assert masks.shape == (2, 80, t) and masks.dtype == torch.float32
    assert log_probs.shape == (2, t // 8, 8192, 1) and tokens.shape == (2, t // 8, 1)
    assert tokens.dtype == torch.int64 and int(tokens.min()) >= 0 and int(tokens.max()) < 8192
    feat_len = lens // 160
    expect = torch.ceil(torch.ceil(torch.ceil(feat_len / 2) / 2) / 2).long()
    assert torch.equal(enc_len, expect)
    assert torch.allclose(log_probs.exp().sum(2), torch.ones(2, t // 8, 1), atol=1e-4)
    _, _, no_masks, _ = tiny(
        input_signal=audio.clone(),
        input_signal_length=lens,
        noisy_input_signal=audio.clone(),
        noisy_input_signal_length=lens,
    )
    assert not no_masks.any()


def test_preprocessor_features(tiny):
    audio, lens = batch()
    tiny.preprocessor.eval()
    feats, flen = tiny.preprocessor(input_signal=audio.clone(), length=lens)
    assert torch.equal(flen, lens // 160) and feats.shape[-1] % 16 == 0
    for b, n in enumerate(flen.tolist()):
        valid = feats[b, :, :n].double()
        assert valid.mean(1).abs().max() < 1e-4
        assert (valid.std(1) - 1).abs().max() < 1e-3
        assert not feats[b, :, n:].any()
    tiny.preprocessor.train()
    x = audio.clone()
    tiny.preprocessor(input_signal=x, length=lens)
    assert not torch.equal(x, audio)  # dither is added in place, as NeMo does
    tiny.preprocessor.eval()


def test_mel_filterbank_matches_librosa_values():
    fb = mel_filterbank(16000, 512, 80, 0, 8000.0)
    assert fb.dtype == np.float32 and fb.shape == (80, 257)
    # values of librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmax=8000, norm="slaney")
    assert float(fb.astype(np.float64).sum()) == 2.55826078139944
    assert float(fb[0, 1]) == float.fromhex("0x1.7134cc0000000p-6")
    assert float(fb[1, 3]) == float.fromhex("0x1.a88f8c0000000p-7")
    assert float(fb[62, 124]) == float.fromhex("0x1.a0b36a0000000p-11")
    assert float(fb[79, 255]) == float.fromhex("0x1.6f9f980000000p-12")


def test_masking_blocks_stay_inside_lengths():
    torch.manual_seed(0)
    masker = RandomBlockMasking(
        feat_in=80, mask_prob=1.0, block_size=40, mask_value=None, freeze=True
    )
    feats = torch.randn(3, 80, 160)
    lens = torch.tensor([160, 100, 39])
    masked, masks = masker(input_feats=feats, input_lengths=lens)
    assert masks.shape == feats.shape and masks.stride(1) == 0  # expanded view, like NeMo
    time = masks[:, 0]
    assert torch.equal(time[0], torch.ones(160))
    assert torch.equal(time[1], (torch.arange(160) < 100).float())
    assert not time[2].any()  # shorter than one block: no valid start
    emb = masker.mask_embedding.view(1, 80, 1).expand_as(feats)
    assert torch.equal(masked, torch.where(masks.bool(), emb, feats))
    assert not masker.mask_embedding.requires_grad


def test_masking_single_start_gives_one_block():
    masker = RandomBlockMasking(
        feat_in=80, mask_prob=0.0, block_size=40, mask_value=0.0, freeze=True
    )
    masker.mask_prob = 0.5
    torch.manual_seed(0)
    draws = torch.rand(1, 200)
    torch.manual_seed(0)
    _, masks = masker(input_feats=torch.zeros(1, 80, 200), input_lengths=torch.tensor([200]))
    starts = (draws[0] < 0.5) & (torch.arange(200) + 40 <= 200)
    expect = torch.zeros(200)
    for s in torch.nonzero(starts).flatten().tolist():
        expect[s : s + 40] = 1
    assert torch.equal(masks[0, 0], expect)


def test_loss_counts_frames_with_7_of_8_masked():
    loss = MultiMLMLoss(
        combine_time_steps=8, mask_threshold=0.8, num_decoders=1, squeeze_single=False
    )
    t = 4  # encoder frames; 32 feature frames
    time_mask = torch.zeros(1, 32)
    time_mask[0, 0:8] = 1  # 8/8: counted
    time_mask[0, 8:15] = 1  # 7/8: counted
    time_mask[0, 16:22] = 1  # 6/8: not counted
    masks = time_mask.unsqueeze(1).expand(1, 80, 32)
    log_probs = torch.log_softmax(torch.randn(1, t, 8192, 1), dim=2)
    tokens = torch.randint(0, 8192, (1, t, 1))
    got = loss(masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=None)
    want = -(log_probs[0, 0, tokens[0, 0, 0], 0] + log_probs[0, 1, tokens[0, 1, 0], 0]) / 2
    assert torch.allclose(got, want, atol=0, rtol=1e-6)


def test_loss_is_nan_when_nothing_is_masked():
    loss = MultiMLMLoss(
        combine_time_steps=8, mask_threshold=0.8, num_decoders=1, squeeze_single=False
    )
    out = loss(
        masks=torch.zeros(2, 80, 32),
        decoder_outputs=torch.log_softmax(torch.randn(2, 4, 16, 1), 2),
        targets=torch.zeros(2, 4, 1, dtype=torch.long),
    )
    assert torch.isnan(out)


def test_quantizer_chunks_match_the_direct_formula(tiny, monkeypatch):
    q = tiny.quantizer
    feats = torch.randn(2, 80, 64)
    monkeypatch.setattr(quantizer_mod, "ROWS_PER_CHUNK", 3)
    xq, xid = q(input_signal=feats)
    x = q.proj(feats.transpose(1, 2).contiguous().reshape(2, 8, 640))
    x = torch.nn.functional.normalize(x.view(2, 8, 1, 16), dim=-1)
    direct = (
        (x.unsqueeze(-1) - q.codebooks.transpose(1, 2).unsqueeze(0).unsqueeze(0))
        .norm(dim=-2)
        .argmin(-1)
    )
    assert torch.equal(xid, direct) and xid.shape == (2, 8, 1)
    assert torch.equal(xq[..., 0], q.codebooks[0][xid[..., 0]].transpose(1, 2))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.mask_position=post_conv", "mask_position='post_conv'"),
        ("model.encoder.self_attention_model=abs_pos", "self_attention_model='abs_pos'"),
        ("model.encoder.use_pytorch_sdpa=true", "use_pytorch_sdpa=True"),
        ("model.encoder.conv_norm_type=layer_norm", "conv_norm_type='layer_norm'"),
        ("model.encoder.stochastic_depth_drop_prob=0.1", "stochastic_depth_drop_prob=0.1"),
        ("model.encoder.subsampling=striding", "subsampling='striding'"),
        ("model.masking.allow_overlap=false", "allow_overlap=False"),
        ("model.quantizer.dist_fn=cosine", "dist_fn='cosine'"),
        ("model.preprocessor.normalize=all_features", "normalize='all_features'"),
        ("model.spec_augment.time_masks=2", "time_masks=2"),
        ("model.encoder.bogus_key=1", "bogus_key"),
    ],
)
def test_unported_config_raises(override, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        NestModel(model_cfg([*TINY, override]))
