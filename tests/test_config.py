"""Configs: every config loads and freezes; overrides are typed; mistakes say what exists."""

import dataclasses

import pytest

from microforge_jax.config import ConfigError, ModelConfig, available_configs, load_config

CONFIGS = ("nano", "tiny", "small", "base")


def test_configs_exist():
    assert set(CONFIGS) <= set(available_configs())


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_freezes(name):
    config = load_config(name)
    assert config.name == name
    cfg = ModelConfig.from_config(config)
    hash(cfg)  # frozen and hashable: usable as a static jit argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.latent_channels = 3
    assert config.image_size % cfg.vae.downsample_factor == 0
    assert len(cfg.vae.stage_channels) == cfg.vae.num_downsamples + 1


def test_config_by_path_equals_by_name():
    assert load_config("configs/tiny.py").to_dict() == load_config("tiny").to_dict()


def test_seed_factors():
    assert ModelConfig.from_config(load_config("nano")).vae.downsample_factor == 4
    for name in ("tiny", "small", "base"):
        assert ModelConfig.from_config(load_config(name)).vae.downsample_factor == 32


def test_overrides_are_typed():
    config = load_config(
        "tiny",
        [
            "model.backbone.depth=3",
            "model.vae.channels=8,16",
            "model.dtype=bfloat16",
            "model.backbone.use_planner=false",
        ],
    )
    assert config.model.backbone.depth == 3
    assert config.model.vae.channels == (8, 16)
    assert config.model.dtype == "bfloat16"
    assert config.model.backbone.use_planner is False
    with pytest.raises(ConfigError, match="expects a int"):
        load_config("tiny", ["model.backbone.depth=three"])
    with pytest.raises(ConfigError, match="expects a bool"):
        load_config("tiny", ["model.backbone.use_planner=maybe"])


def test_unknown_key_says_what_exists():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.backbone.dpth'.*model.backbone.depth"):
        load_config("tiny", ["model.backbone.dpth=3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle.dim'"):
        load_config("tiny", ["modle.dim=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("tiny", ["model.backbone.depth"])


def test_unknown_config_name_lists_configs():
    with pytest.raises(ConfigError, match="available configs are base, nano, small, tiny"):
        load_config("nanoo")


def test_loaded_config_is_locked():
    config = load_config("nano")
    with pytest.raises((AttributeError, KeyError)):
        config.model.backbone.dpth = 3


def test_invalid_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backbone.scan_impl must be one of"):
        ModelConfig.from_config(load_config("nano", ["model.backbone.scan_impl=fast"]))
    with pytest.raises(ConfigError, match="power of two"):
        ModelConfig.from_config(load_config("nano", ["model.vae.downsample_factor=12"]))
