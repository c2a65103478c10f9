"""The CLIP vision tower (ViT) in Flax, mirroring transformers' `CLIPVisionModel` (the image half of CLIP).

Patches (a stride-`patch_size` conv without bias) plus a class token and learned positions, a
pre-LayerNorm, pre-LN encoder layers (the same `EncoderLayer` as the CLIP text tower, without a
mask) and a LayerNorm on the class token: `pooler_output`, which `visual_projection` maps into
the space CLIP shares with text. Images are NHWC, already preprocessed (resized, cropped, normalised
with CLIP's mean/std); loading and preprocessing live in `microforge_jax.eval.clip_score`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax.models import layers
from microforge_jax.models.text import ACTIVATIONS, EncoderLayer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP ViT (frozen, hashable)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; known: {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> CLIPVisionConfig:
        """Reads a transformers `config.json` dict: a full CLIP's `vision_config` or a CLIP vision model's."""
        if hf.get("model_type") == "clip":
            hf = {"model_type": "clip_vision_model", **hf.get("vision_config", {})}
        if hf.get("model_type") != "clip_vision_model":
            raise ValueError(f"unsupported model_type {hf.get('model_type')!r}: expected 'clip' or 'clip_vision_model'")
        # CLIPVisionConfig's defaults (ViT-B/32), for nested configs that list only what differs.
        return cls(
            hidden_size=hf.get("hidden_size", 768),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            intermediate_size=hf.get("intermediate_size", 3072),
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 32),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
        )


class CLIPVisionTransformer(nn.Module):
    """`CLIPVisionModel`: preprocessed images (B, S, S, 3) -> (hidden_BxLxD, pooled_BxD).

    Parameter names (mapped from Hugging Face names in `microforge_jax.eval.clip_score`):
    `patch_embed` (conv kernel HWIO), `class_embed` (D,), `position_embed`, `pre_norm`,
    `layers_{i}/{attn,mlp,norm1,norm2}`, `post_norm`.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_BxSxSx3: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, _ = pixels_BxSxSx3.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"CLIP vision input is {h}x{w}, the model expects {c.image_size}x{c.image_size}")
        p = c.patch_size
        x = layers.conv(c.hidden_size, (p, p), strides=p, padding="VALID", use_bias=False, name="patch_embed", **kw)(
            pixels_BxSxSx3.astype(self.dtype)
        )
        x_BxNxD = x.reshape(b, -1, c.hidden_size)  # row-major over the patch grid, as torch's flatten(2)
        cls_D = self.param("class_embed", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
        cls_Bx1xD = jnp.broadcast_to(cls_D.astype(self.dtype), (b, 1, c.hidden_size))
        x_BxLxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        pos = self.param(
            "position_embed", nn.initializers.normal(0.02), (c.num_positions, c.hidden_size), self.param_dtype
        )
        x_BxLxD = x_BxLxD + pos.astype(self.dtype)[None]
        x_BxLxD = layers.layer_norm(epsilon=c.layer_norm_eps, name="pre_norm", **kw)(x_BxLxD)
        length = x_BxLxD.shape[1]
        allowed_BxLxL = jnp.ones((b, length, length), bool)
        for i in range(c.num_layers):
            x_BxLxD = EncoderLayer(
                c.num_heads, c.intermediate_size, c.hidden_act, pre_ln=True,
                layer_norm_eps=c.layer_norm_eps, name=f"layers_{i}", **kw,
            )(x_BxLxD, allowed_BxLxL)  # fmt: skip
        pooled_BxD = layers.layer_norm(epsilon=c.layer_norm_eps, name="post_norm", **kw)(x_BxLxD[:, 0])
        return x_BxLxD, pooled_BxD.astype(jnp.float32)
