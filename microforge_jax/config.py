"""Loading configs, typed command-line overrides, and the frozen `ModelConfig` boundary.

Configs are Python files under `configs/` with a `get_config()` returning an
`ml_collections.ConfigDict`. `load_config("nano")` and `load_config("configs/nano.py")` are the
same. Overrides are `key.path=value` strings typed by the declared value; a misspelled key or a
value of the wrong type is a `ConfigError` that says what exists.

The model section crosses into model code exactly once, as `ModelConfig.from_config(config)`:
a frozen (hashable) dataclass the modules receive as `cfg`. Modules never read configs, flags,
files or the environment.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; its message is one line meant for the user."""


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `configs/<name>.py` (or a path to a config file) and applies `overrides`."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.is_file():
        raise ConfigError(
            f"unknown config {name_or_path!r}: available configs are {', '.join(available_configs())} "
            f"(or a path to a .py file with get_config())"
        )
    # Config files import their parent (`from configs import base`): make it importable.
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_microforge_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    config = module.get_config()
    apply_overrides(config, overrides)
    config.lock()
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    keys = _all_keys(config)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    return ConfigError(f"unknown config key {key!r}{hint} (keys here: {', '.join(siblings)})")


def _parse(key: str, text: str, current: Any) -> Any:
    """Parses `text` as a value of the same type as `current`."""
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, tuple):
            value = ast.literal_eval(text if text.strip().startswith(("(", "[")) else f"({text},)")
            return tuple(value)
        if current is None:
            return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    else:
        raise ConfigError(f"config key {key!r} has type {type(current).__name__}, which overrides do not support")
    raise ConfigError(f"config key {key!r} expects a {type(current).__name__} (like {current!r}), got {text!r}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `key.path=value` overrides in place, typed by the current value."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, text = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        node, *_ = [config]
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise _unknown_key(config, key)
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
            raise _unknown_key(config, key)
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; override one of its keys")
        with node.unlocked():
            node[parts[-1]] = _parse(key, text, current)


# ----------------------------------------------------------------------------- ModelConfig


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    channels: tuple[int, ...]
    downsample_factor: int
    encoder_blocks: int
    decoder_blocks: int
    latent_channels: int
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # "dc": the deep-compression VAE; "pixel": no autoencoder, the "latent" is the image itself
    # (downsample_factor 1, 3 channels; the backbone's patches do the compression). "dc" in runs
    # saved before the key existed.
    kind: str = "dc"

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Widths of the log2(factor) + 1 stages: the channel list, its last width repeated."""
        n = self.num_downsamples + 1
        if n < len(self.channels):
            return tuple(self.channels[:n])
        return tuple(self.channels) + (self.channels[-1],) * (n - len(self.channels))

    @property
    def num_downsamples(self) -> int:
        return int(round(math.log2(self.downsample_factor)))


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    depth: int
    dim: int
    head_dim: int
    ffn_expand: int
    ssm_expand: int
    ssm_state: int
    dt_rank: int
    conv_kernel: int
    scan_impl: str
    scan_chunk: int
    shared_attn_every: int
    adaln_group_size: int
    pos_embed: str
    use_planner: bool
    mixer: str
    use_shared_attn: bool
    use_dwconv: bool
    adaln: str
    latent_channels: int
    text_dim: int
    remat: bool = False  # recompute each block's activations in the backward pass (memory, not math)
    patch_size: int = 1  # latent cells per token side (DiT patchify); 1 in runs saved before the key existed
    # Positions of the source half when editing: "grid" (its own columns w..2w-1 of the [target |
    # source] grid; runs saved before the key existed) or "aligned" (the target's, so token (i, j)
    # of the source sits at the position of target token (i, j), as in FLUX.1 Kontext).
    source_positions: str = "grid"
    # Editing: also add a zero-initialised projection of source token (i, j) to target token (i, j)
    # (a channel-concatenation path beside the width concatenation); False in runs saved before.
    source_skip: bool = False
    # Initial value of each block's cross-attention gate (a per-channel scale on the text/plan
    # cross-attention's residual). 0 (DiT-style zero init; runs saved before the key existed)
    # keeps the text path shut at init; 1 opens it, as PixArt's ungated cross-attention.
    cross_gate_init: float = 0.0
    # The same for the shared self-attention block's gate (0 in runs saved before the key existed).
    shared_gate_init: float = 0.0
    # What the network's output means: "velocity" (v = eps - x0, the flow's target) or "x" (the clean
    # latent x0, turned into the velocity (z_t - x0) / max(t, X_PRED_MIN_T) inside the backbone, so
    # the loss and every sampler still see a velocity; JiT, arXiv 2511.13720). "velocity" in runs
    # saved before the key existed.
    prediction: str = "velocity"
    # x-prediction with a source (edit / inpaint / SR): the network predicts the clean target as
    # source + its output, so copying the unedited rest is the zero output (False in runs saved before).
    source_residual: bool = False

    @property
    def num_heads(self) -> int:
        return max(1, self.dim // self.head_dim)

    @property
    def ssm_inner(self) -> int:
        return self.ssm_expand * self.dim

    @property
    def ssm_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.dim / 16)


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    num_tokens: int
    depth: int
    diversity_weight: float
    dim: int
    head_dim: int
    latent_channels: int
    text_dim: int
    patch_size: int = 1  # latent cells per READ token side (1 in runs saved before the key existed)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    encoder: str
    path: str
    embed_dim: int
    max_length: int
    simple_layers: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model section of a config, frozen: what every module receives as `cfg`."""

    dtype: str
    param_dtype: str
    latent_channels: int
    vae: VAEConfig
    backbone: BackboneConfig
    planner: PlannerConfig
    text: TextConfig

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ModelConfig:
        m = config.model if "model" in config else config
        d = m.to_dict()
        c = d["latent_channels"]
        try:
            text = TextConfig(**d["text"])
            vae = VAEConfig(**d["vae"], latent_channels=c)
            backbone = BackboneConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in d["backbone"].items()},
                latent_channels=c,
                text_dim=text.embed_dim,
            )
            planner = PlannerConfig(
                **d["planner"],
                dim=backbone.dim,
                head_dim=backbone.head_dim,
                latent_channels=c,
                text_dim=text.embed_dim,
            )
        except TypeError as e:  # a key the dataclasses do not know, or one missing
            raise ConfigError(f"model config does not match ModelConfig: {e}") from None
        vae = dataclasses.replace(vae, channels=tuple(vae.channels))
        cfg = cls(d["dtype"], d["param_dtype"], c, vae, backbone, planner, text)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        f = self.vae.downsample_factor
        if self.vae.kind == "pixel":
            if f != 1 or self.latent_channels != 3:
                raise ConfigError(
                    "model.vae.kind='pixel' works on the image itself: set model.vae.downsample_factor=1 and "
                    f"model.latent_channels=3 (got {f} and {self.latent_channels})"
                )
        elif f < 2 or f & (f - 1):
            raise ConfigError(f"model.vae.downsample_factor must be a power of two, got {f}")
        if self.backbone.source_residual and self.backbone.prediction != "x":
            raise ConfigError("model.backbone.source_residual needs model.backbone.prediction='x'")
        if self.planner.patch_size < 1:
            raise ConfigError(f"model.planner.patch_size must be >= 1, got {self.planner.patch_size}")
        p = self.backbone.patch_size
        if p < 1:
            raise ConfigError(f"model.backbone.patch_size must be >= 1, got {p}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        choices = {
            "vae.kind": ("dc", "pixel"),
            "backbone.prediction": ("velocity", "x"),
            "backbone.scan_impl": ("auto", "associative", "chunked", "sequential", "native", "pallas"),
            "backbone.mixer": ("bissm", "attention"),
            "backbone.adaln": ("group", "full"),
            "backbone.pos_embed": ("sincos", "none"),
            "backbone.source_positions": ("grid", "aligned"),
            "text.encoder": ("minilm", "bert", "clip", "simple"),
        }
        for key, allowed in choices.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value not in allowed:
                raise ConfigError(f"model.{key} must be one of {', '.join(allowed)}, got {value!r}")
