"""Config validation: what the port does not implement is rejected with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nest_ssl.config import ConfigError, validate_model_config

ROOT = Path(__file__).resolve().parents[1]


def model_cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "config" / "nest_fast-conformer.yaml")
    cfg.model.train_ds.manifest_filepath = "train.json"
    cfg.model.validation_ds.manifest_filepath = "val.json"
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg.model


def test_shipped_config_is_accepted_and_resolved():
    model = validate_model_config(model_cfg())
    assert model["train_ds"]["sample_rate"] == 16000
    assert model["optim"]["sched"]["d_model"] == 512
    assert model["train_ds"]["shuffle"] is True


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.train_ds.is_tarred", True, r"model.train_ds.is_tarred=True is not supported"),
        ("model.train_ds.is_concat", True, r"model.train_ds.is_concat=True"),
        ("model.validation_ds.use_lhotse", True, r"model.validation_ds.use_lhotse=True"),
        ("model.train_ds.trim_silence", True, r"model.train_ds.trim_silence=True"),
        ("model.train_ds.channel_selector", 0, r"model.train_ds.channel_selector=0"),
        ("model.train_ds.augmentor", {"white_noise": {}}, r"model.train_ds.augmentor is not"),
        ("model.train_ds.tarred_audio_filepaths", "a.tar", "tarred_audio_filepaths"),
        ("model.test_ds", {"manifest_filepath": "t.json"}, r"model.test_ds is not supported"),
        ("model.optim_param_groups", {"encoder": {"lr": 1}}, "model.optim_param_groups"),
        ("model.init_from_nemo_model", "x.nemo", "model.init_from_nemo_model"),
        ("model.num_books", 2, r"model.num_books=2"),
        ("model.mask_position", "post_conv", r"model.mask_position='post_conv'"),
        ("model.optim.name", "adam", r"model.optim.name='adam'"),
        ("model.optim.args", {"name": "auto"}, r"model.optim.args is not supported"),
        ("model.optim.sched.name", "CosineAnnealing", r"model.optim.sched.name='Cosine"),
        ("model.optim.sched.hold_steps", 5, r"model.optim.sched.hold_steps is not"),
        (
            "model.train_ds.batch_augmentor._target_",
            "nemo.collections.asr.modules.ssl_modules.SpeakerNoiseAugmentation",
            r"model.train_ds.batch_augmentor._target_=",
        ),
        ("model.train_ds.batch_augmentor.foo", 1, r"batch_augmentor.foo is not supported"),
    ],
)
def test_unsupported_keys_and_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_model_config(model_cfg(**{key: value}))


def test_missing_mandatory_manifest_is_named():
    cfg = OmegaConf.load(ROOT / "config" / "nest_fast-conformer.yaml")
    with pytest.raises(ConfigError, match=r"missing.*train_ds.manifest_filepath"):
        validate_model_config(cfg.model)


def test_null_manifest_and_list_validation_manifest_are_rejected():
    with pytest.raises(ConfigError, match="train_ds.manifest_filepath is required"):
        validate_model_config(model_cfg(**{"model.train_ds.manifest_filepath": None}))
    with pytest.raises(ConfigError, match="multi-dataloader validation"):
        validate_model_config(model_cfg(**{"model.validation_ds.manifest_filepath": ["a", "b"]}))


def test_train_manifest_list_and_free_sizes_are_accepted():
    cfg = model_cfg(
        **{
            "model.train_ds.manifest_filepath": ["a.json", "b.json"],
            "model.train_ds.batch_size": 3,
            "model.encoder.n_layers": 2,
        }
    )
    assert validate_model_config(cfg)["train_ds"]["manifest_filepath"] == ["a.json", "b.json"]


def test_module_sections_are_checked_when_the_model_is_built(tmp_path):
    from nest_ssl.model import NestModel

    cfg = model_cfg(**{"model.encoder.self_attention_model": "abs_pos"})
    validate_model_config(cfg)  # the data/optim check leaves module sections to the model
    with pytest.raises(ValueError, match="self_attention_model"):
        NestModel(cfg)
