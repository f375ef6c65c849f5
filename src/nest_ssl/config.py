"""Checks a NEST config against what this port implements.

Every key of the ``model`` section must be known, and keys of the data and optimizer sections that
select a behaviour must hold a value the port implements; anything else raises
:class:`ConfigError` naming the key. The module sections (preprocessor, encoder, ...) are checked
the same way by :class:`nest_ssl.model.NestModel` when it builds them. Sizes and
rates (layers, widths, dropout, durations, batch size, ...) are free. Keys that NeMo reads but that
have no effect on this configuration (``use_start_end_token``, the bucketing and concat keys of a
dataset that is neither tarred nor concatenated) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

ANY = object()  # any value


class ConfigError(ValueError):
    """The config asks for something this port does not implement."""


AUGMENTOR = {
    "_target_": (
        "nemo.collections.asr.modules.ssl_modules.MultiSpeakerNoiseAugmentation",
        "nemo.collections.asr.modules.ssl_modules.augmentation.MultiSpeakerNoiseAugmentation",
        "nest_ssl.augmentation.MultiSpeakerNoiseAugmentation",
    ),
    **dict.fromkeys(["prob", "noise_ratio", "min_r_speech", "max_r_speech"], ANY),
    **dict.fromkeys(["min_r_noise", "max_r_noise", "min_mix_rate", "max_mix_rate"], ANY),
    **dict.fromkeys(["min_num_segments", "max_num_segments"], ANY),
    **dict.fromkeys(["min_num_speakers", "max_num_speakers"], ANY),
}

DATASET = {
    "manifest_filepath": ANY,
    "noise_manifest": ANY,
    "sample_rate": ANY,
    "batch_size": ANY,
    "shuffle": ANY,
    "num_workers": ANY,
    "pin_memory": ANY,
    "drop_last": ANY,
    "max_duration": ANY,
    "min_duration": ANY,
    "batch_augmentor": AUGMENTOR,
    "trim_silence": (False,),
    "is_concat": (False,),
    "is_tarred": (False,),
    "use_lhotse": (False,),
    "defer_setup": (False,),
    "int_values": (False,),
    "channel_selector": (None,),
    "tarred_audio_filepaths": (None,),
    "labels": ANY,
    "use_start_end_token": ANY,
    "concat_sampling_technique": ANY,
    "concat_sampling_temperature": ANY,
    "concat_sampling_probabilities": ANY,
    "shuffle_n": ANY,
    "bucketing_strategy": ANY,
    "bucketing_batch_size": (None,),
}

MODEL: dict[str, Any] = {
    "sample_rate": ANY,
    "num_classes": ANY,
    "num_books": (1,),
    "code_dim": ANY,
    "squeeze_single": (False,),
    "mask_position": ("pre_conv",),
    "target": ANY,
    "nemo_version": ANY,
    "train_ds": DATASET,
    "validation_ds": DATASET,
    # Module sections: checked key by key where the model builds them (nest_ssl.model).
    **dict.fromkeys(("preprocessor", "spec_augment", "masking", "quantizer", "encoder"), ANY),
    **dict.fromkeys(("decoder", "loss"), ANY),
    "optim": {
        "name": ("adamw",),
        "lr": ANY,
        "betas": ANY,
        "weight_decay": ANY,
        "eps": ANY,
        "amsgrad": ANY,
        "sched": {
            "name": ("NoamAnnealing",),
            "d_model": ANY,
            "warmup_steps": ANY,
            "warmup_ratio": ANY,
            "min_lr": ANY,
            "max_steps": ANY,
            "last_epoch": ANY,
            "monitor": ANY,
        },
    },
}

REQUIRED = ("preprocessor", "masking", "quantizer", "encoder", "decoder", "loss")


def _check(node: Any, schema: dict[str, Any], where: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{where} must be a mapping, got {node!r}")
    for key, value in node.items():
        name = f"{where}.{key}"
        if key not in schema:
            raise ConfigError(f"{name} is not supported by nest_ssl (known keys: {sorted(schema)})")
        rule = schema[key]
        if rule is ANY:
            continue
        if isinstance(rule, dict):
            if value is not None:
                _check(value, rule, name)
        elif value not in rule:
            raise ConfigError(
                f"{name}={value!r} is not supported by nest_ssl (supported: {list(rule)})"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, resolved dict; a missing mandatory value (``???``) is named in the error."""
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"mandatory config values missing: {missing}")
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def validate_model_config(cfg: Any, where: str = "model") -> dict[str, Any]:
    """Check the ``model`` section; returns it as a plain dict."""
    model = to_dict(cfg)
    _check(model, MODEL, where)
    for key in REQUIRED:
        if model.get(key) is None:
            raise ConfigError(f"{where}.{key} is required")
    for key in ("train_ds", "validation_ds"):
        ds = model.get(key)
        if ds is not None and ds.get("manifest_filepath") is None:
            raise ConfigError(f"{where}.{key}.manifest_filepath is required")
        if ds is not None and "shuffle" not in ds and key == "train_ds":
            ds["shuffle"] = True
    val = model.get("validation_ds") or {}
    if not isinstance(val.get("manifest_filepath", ""), str):
        raise ConfigError(
            f"{where}.validation_ds.manifest_filepath must be one string (comma-separated for "
            "several manifests): a list selects NeMo's multi-dataloader validation, which nest_ssl "
            "does not implement"
        )
    return model
