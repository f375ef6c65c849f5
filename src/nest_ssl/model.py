"""NestModel: NeMo's EncDecDenoiseMaskedTokenPredModel (NEST) as a plain ``torch.nn.Module``.

The ``model:`` config section is mapped to the port's own modules (``_target_`` keys are ignored).
Construction replays NeMo's RNG use: NeMo's parent class builds an encoder and a decoder that its
subclass throws away, so the port builds (and drops) them too, in the same order. The model needs
no Lightning; ``nest_ssl.training.NestPretraining`` adds it for training.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nest_ssl.conformer import ConformerEncoder
from nest_ssl.decoder import MultiSoftmaxDecoder
from nest_ssl.features import FilterbankFeatures, MelPreprocessor
from nest_ssl.loss import MultiMLMLoss
from nest_ssl.masking import RandomBlockMasking
from nest_ssl.quantizer import RandomProjectionQuantizer

# Per section: NeMo's constructor defaults (REQUIRED: none), then the values the port implements.
REQUIRED = "<required>"
# fmt: off
PREPROCESSOR = {
    "sample_rate": 16000, "window_size": 0.02, "window_stride": 0.01, "n_window_size": None,
    "n_window_stride": None, "window": "hann", "normalize": "per_feature", "n_fft": None,
    "preemph": 0.97, "features": 64, "lowfreq": 0, "highfreq": None, "log": True,
    "log_zero_guard_type": "add", "log_zero_guard_value": 2**-24, "dither": 1e-5, "pad_to": 16,
    "frame_splicing": 1, "exact_pad": False, "pad_value": 0, "mag_power": 2.0, "rng": None,
    "nb_augmentation_prob": 0.0, "nb_max_freq": 4000, "mel_norm": "slaney",
    "use_torchaudio": False, "stft_exact_pad": False, "stft_conv": False,
}
PREPROCESSOR_ONLY = {
    "window": ["hann"], "normalize": ["per_feature"], "log": [True], "log_zero_guard_type": ["add"],
    "frame_splicing": [1], "exact_pad": [False], "mag_power": [2.0], "rng": [None],
    "nb_augmentation_prob": [0.0], "mel_norm": ["slaney"], "stft_exact_pad": [False],
    "stft_conv": [False],
}
SPEC_AUGMENT = {
    "freq_masks": 0, "time_masks": 0, "freq_width": 10, "time_width": 10, "rect_masks": 0,
    "rect_time": 5, "rect_freq": 20, "rng": None, "mask_value": 0.0,
    "use_vectorized_spec_augment": True, "use_numba_spec_augment": False,
}
SPEC_AUGMENT_ONLY = {"freq_masks": [0], "time_masks": [0], "rect_masks": [0]}
MASKING = {
    "feat_in": REQUIRED, "mask_prob": 0.5, "block_size": 48, "mask_value": None, "freeze": True,
    "allow_overlap": False, "max_mask_ratio": 0.8,
}
MASKING_ONLY = {"allow_overlap": [True]}
QUANTIZER = {
    "feat_in": REQUIRED, "code_dim": REQUIRED, "num_classes": REQUIRED, "num_books": REQUIRED,
    "dist_fn": "cosine", "time_ahead": False, "freeze": True, "squeeze_single": False,
    "combine_time_steps": 1,
}
QUANTIZER_ONLY = {"dist_fn": ["l2"], "time_ahead": [False]}
ENCODER = {
    "feat_in": REQUIRED, "n_layers": REQUIRED, "d_model": REQUIRED, "feat_out": -1,
    "causal_downsampling": False, "subsampling": "striding", "subsampling_factor": 4,
    "subsampling_conv_chunking_factor": 1, "subsampling_conv_channels": -1, "reduction": None,
    "reduction_position": None, "reduction_factor": 1, "ff_expansion_factor": 4,
    "self_attention_model": "rel_pos", "n_heads": 4, "att_context_size": None,
    "att_context_probs": None, "att_chunk_context_size": None, "att_context_style": "regular",
    "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000, "conv_kernel_size": 31,
    "conv_norm_type": "batch_norm", "conv_context_size": None, "conv_context_style": "regular",
    "use_bias": True, "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.1,
    "dropout_att": 0.0, "stochastic_depth_drop_prob": 0.0, "stochastic_depth_mode": "linear",
    "stochastic_depth_start_layer": 1, "global_tokens": 0, "global_tokens_spacing": 1,
    "global_attn_separate": False, "use_pytorch_sdpa": False, "use_pytorch_sdpa_backends": None,
    "sync_max_audio_length": True,
}
ENCODER_ONLY = {
    "feat_out": [-1], "causal_downsampling": [False], "subsampling": ["dw_striding"],
    "subsampling_conv_chunking_factor": [1], "reduction": [None],
    "self_attention_model": ["rel_pos"], "att_context_size": [None, [-1, -1]],
    "att_context_probs": [None], "att_chunk_context_size": [None],
    "att_context_style": ["regular"], "untie_biases": [True], "conv_norm_type": ["batch_norm"],
    "conv_context_style": ["regular"], "stochastic_depth_drop_prob": [0.0], "global_tokens": [0],
    "use_pytorch_sdpa": [False], "sync_max_audio_length": [True],
}
DECODER = {
    "feat_in": REQUIRED, "num_classes": REQUIRED, "num_decoders": 1,
    "init_mode": "xavier_uniform", "use_bias": False, "squeeze_single": False,
}
DECODER_ONLY = {"init_mode": ["xavier_uniform"]}
LOSS = {"combine_time_steps": 1, "mask_threshold": 0.8, "num_decoders": 1, "squeeze_single": False}
# top-level model keys that change NeMo's model and that the port does not implement
UNSUPPORTED_TOP = ("loss_list", "dropout_features", "dropout_features_q", "feature_penalty",
                   "access")
# fmt: on


def section(
    cfg: DictConfig, name: str, defaults: dict[str, Any], only: dict[str, list[Any]] | None = None
) -> dict[str, Any]:
    """``cfg[name]`` as a dict over NeMo's defaults; unknown keys and unported values raise."""
    if name not in cfg or cfg[name] is None:
        raise ValueError(f"model.{name}: section missing from the config")
    raw = OmegaConf.to_container(cfg[name], resolve=True)
    raw.pop("_target_", None)
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"model.{name}: keys not supported by the nest port: {unknown}")
    values = {**defaults, **raw}
    missing = [
        k for k, v in values.items() if v is REQUIRED or (v is None and defaults[k] is REQUIRED)
    ]
    if missing:
        raise ValueError(f"model.{name}: required keys missing or null: {missing}")
    for key, allowed in (only or {}).items():
        if values[key] not in allowed:
            raise ValueError(
                f"model.{name}.{key}={values[key]!r} is not implemented by the nest port "
                f"(supported: {allowed})"
            )
    return values


def build_preprocessor(c: dict[str, Any]) -> MelPreprocessor:
    sr = c["sample_rate"]
    win = c["n_window_size"] or int(c["window_size"] * sr)
    hop = c["n_window_stride"] or int(c["window_stride"] * sr)
    if (
        isinstance(c["log_zero_guard_value"], str)
        or not isinstance(c["pad_to"], int)
        or c["pad_to"] <= 0
    ):
        raise ValueError(
            "model.preprocessor: the nest port needs a numeric log_zero_guard_value and an integer "
            f"pad_to > 0, got log_zero_guard_value={c['log_zero_guard_value']!r}, "
            f"pad_to={c['pad_to']!r}"
        )
    n_fft = c["n_fft"] or 2 ** (win - 1).bit_length()
    return MelPreprocessor(
        FilterbankFeatures(
            sample_rate=sr,
            win_length=win,
            hop_length=hop,
            n_fft=n_fft,
            n_mels=c["features"],
            lowfreq=c["lowfreq"],
            highfreq=c["highfreq"],
            dither=c["dither"],
            preemph=c["preemph"],
            log_guard=c["log_zero_guard_value"],
            pad_to=c["pad_to"],
            pad_value=c["pad_value"],
        )
    )


def build_encoder(c: dict[str, Any]) -> ConformerEncoder:
    k = c["conv_kernel_size"]
    if (k - 1) % 2:
        raise ValueError(f"model.encoder.conv_kernel_size={k} must be odd")
    ctx = c["conv_context_size"]
    if ctx is None:
        ctx = [(k - 1) // 2, (k - 1) // 2]
    elif ctx == "causal":
        ctx = [k - 1, 0]
    if not (isinstance(ctx, list) and len(ctx) == 2 and ctx[0] + ctx[1] + 1 == k):
        raise ValueError(f"model.encoder.conv_context_size={c['conv_context_size']!r} is invalid")
    return ConformerEncoder(
        feat_in=c["feat_in"],
        n_layers=c["n_layers"],
        d_model=c["d_model"],
        subsampling_factor=c["subsampling_factor"],
        subsampling_conv_channels=c["subsampling_conv_channels"],
        ff_expansion_factor=c["ff_expansion_factor"],
        n_heads=c["n_heads"],
        xscaling=c["xscaling"],
        pos_emb_max_len=c["pos_emb_max_len"],
        conv_kernel_size=k,
        conv_context=(ctx[0], ctx[1]),
        dropout=c["dropout"],
        dropout_pre_encoder=c["dropout_pre_encoder"],
        dropout_emb=c["dropout_emb"],
        dropout_att=c["dropout_att"],
        use_bias=c["use_bias"],
    )


def build_decoder(c: dict[str, Any]) -> MultiSoftmaxDecoder:
    return MultiSoftmaxDecoder(
        c["feat_in"], c["num_classes"], c["num_decoders"], c["squeeze_single"], c["use_bias"]
    )


class SpectrogramAugmentation(nn.Module):
    """NeMo builds SpecAugment here; with zero masks it is the identity, and NEST never calls it."""

    def forward(self, input_spec: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return input_spec


class NestModel(nn.Module):
    """NEST: denoising masked-token prediction on a FastConformer encoder.

    Children (registration = state_dict order): preprocessor, encoder, loss, spec_augmentation,
    quantizer, mask_processor, decoder.
    """

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        for key in UNSUPPORTED_TOP:
            if key in cfg:
                raise ValueError(f"model.{key} is not implemented by the nest port")
        if cfg.get("mask_position", "pre_conv") != "pre_conv":
            raise ValueError(
                f"model.mask_position={cfg.get('mask_position')!r} is not implemented by the nest "
                "port (supported: 'pre_conv')"
            )
        pre = section(cfg, "preprocessor", PREPROCESSOR, PREPROCESSOR_ONLY)
        enc = section(cfg, "encoder", ENCODER, ENCODER_ONLY)
        dec = section(cfg, "decoder", DECODER, DECODER_ONLY)
        loss = section(cfg, "loss", LOSS)
        section(cfg, "spec_augment", SPEC_AUGMENT, SPEC_AUGMENT_ONLY)
        quant = section(cfg, "quantizer", QUANTIZER, QUANTIZER_ONLY)
        mask = section(cfg, "masking", MASKING, MASKING_ONLY)

        self.preprocessor = build_preprocessor(pre)
        # NeMo's parent class draws a full encoder and decoder first; the subclass drops them.
        self.encoder = build_encoder(enc)
        build_decoder(dec)
        self.loss = MultiMLMLoss(
            loss["combine_time_steps"],
            loss["mask_threshold"],
            loss["num_decoders"],
            loss["squeeze_single"],
        )
        self.spec_augmentation = SpectrogramAugmentation()
        self.quantizer = RandomProjectionQuantizer(
            feat_in=quant["feat_in"],
            code_dim=quant["code_dim"],
            num_books=quant["num_books"],
            num_classes=quant["num_classes"],
            combine_time_steps=quant["combine_time_steps"],
            squeeze_single=quant["squeeze_single"],
            freeze=quant["freeze"],
        )
        self.mask_processor = RandomBlockMasking(
            feat_in=mask["feat_in"],
            mask_prob=mask["mask_prob"],
            block_size=mask["block_size"],
            mask_value=mask["mask_value"],
            freeze=mask["freeze"],
        )
        self.encoder = build_encoder(enc)  # keeps the first encoder's slot
        self.decoder = build_decoder(dec)

    def forward(
        self,
        input_signal,
        input_signal_length,
        noise_signal=None,
        noise_signal_length=None,
        noisy_input_signal=None,
        noisy_input_signal_length=None,
        apply_mask=False,
    ):
        """Returns (log_probs (B,T',C,K), encoded_len (B,), masks (B,D,T), tokens (B,T',K)).

        Tokens come from the clean features; the encoder sees the (masked) noisy features. The
        noise inputs are accepted and unused, as in NeMo.
        """
        if noisy_input_signal is None or noisy_input_signal_length is None:
            raise ValueError("NestModel.forward needs noisy_input_signal and its lengths")
        clean, _ = self.preprocessor(input_signal=input_signal, length=input_signal_length)
        noisy, noisy_len = self.preprocessor(
            input_signal=noisy_input_signal, length=noisy_input_signal_length
        )
        _, tokens = self.quantizer(input_signal=clean)
        if apply_mask:
            feats, masks = self.mask_processor(input_feats=noisy, input_lengths=noisy_len)
        else:
            feats, masks = noisy, torch.zeros_like(noisy)
        encoded, encoded_len = self.encoder(audio_signal=feats, length=noisy_len)
        return self.decoder(encoder_output=encoded), encoded_len, masks, tokens
