"""Losses that are not rectified flow: the VAE stage's reconstruction, perceptual and GAN terms.

The perceptual term (`train.vae.perceptual`):
  - "lpips": LPIPS (VGG16, v0.1 heads; `microforge_jax.lpips`) with pretrained weights from the
    file the user names in `train.vae.lpips_weights` (nothing is downloaded; the file is checked
    when the VAE stage starts, before any training).
  - "gradient" (the default, as those weights cannot be fetched offline): a documented
    substitute, an L1 on image gradients (finite differences) at three scales, which penalises
    the blur and lost edges that L1 alone tolerates. It is not LPIPS and not a learned metric.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from microforge_jax.models import layers

Dtype = Any


def _avg_pool2(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def gradient_loss(x_BxHxWx3: jax.Array, y_BxHxWx3: jax.Array, scales: int = 3) -> jax.Array:
    """Mean L1 between the horizontal and vertical finite differences of x and y, over scales."""
    x, y = x_BxHxWx3.astype(jnp.float32), y_BxHxWx3.astype(jnp.float32)
    total = 0.0
    for s in range(scales):
        if s:
            if min(x.shape[1:3]) < 4:
                break
            x, y = _avg_pool2(x), _avg_pool2(y)
        dx = jnp.abs((x[:, :, 1:] - x[:, :, :-1]) - (y[:, :, 1:] - y[:, :, :-1])).mean()
        dy = jnp.abs((x[:, 1:] - x[:, :-1]) - (y[:, 1:] - y[:, :-1])).mean()
        total = total + dx + dy
    return total / scales


PERCEPTUAL_KINDS: tuple[str, ...] = ("gradient", "lpips")


def perceptual_loss_fn(kind: str, lpips_module: Any = None, lpips_params: Any = None) -> Any:
    """The perceptual term `(recon, target) -> fp32 scalar` of `train.vae.perceptual = kind`.

    For "lpips", the mean LPIPS distance under `lpips_module.apply(lpips_params, ...)`; the
    weights are behind `stop_gradient` (frozen: the gradient reaches the images, not the VGG).
    """
    if kind == "gradient":
        return gradient_loss
    if kind == "lpips":
        if lpips_module is None or lpips_params is None:
            raise ValueError("perceptual='lpips' needs the LPIPS module and its weights (lpips.load_weights)")
        frozen = jax.lax.stop_gradient(lpips_params)
        return lambda x, y: jnp.mean(lpips_module.apply(frozen, x, y))
    raise ValueError(f"train.vae.perceptual must be one of {', '.join(PERCEPTUAL_KINDS)}, got {kind!r}")


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator: strided 4x4 convs with LeakyReLU, a logit per patch."""

    channels: int = 64
    num_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x_BxHxWx3.astype(self.dtype)
        for i in range(self.num_layers):
            width = self.channels * min(2**i, 8)
            h = layers.conv(width, (4, 4), strides=2, padding=((1, 1), (1, 1)), name=f"conv{i}", **kw)(h)
            if i:
                h = layers.group_norm(layers.num_groups(width), name=f"norm{i}", **kw)(h)
            h = nn.leaky_relu(h, 0.2)
        return layers.conv(1, (3, 3), name="logits", **kw)(h).astype(jnp.float32)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """The discriminator's hinge loss."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """The generator's (VAE decoder's) adversarial loss."""
    return -jnp.mean(fake_logits)


# ----------------------------------------------------------------------------- attribute alignment

NUM_SHAPE_CLASSES = 9  # empty cell + the shapes world's 8 shapes
NUM_COLOUR_CLASSES = 11  # empty cell + its 10 colours


def grid_cells(h: int, w: int) -> jax.Array:
    """(h, w) int32: the 3x3-grid cell (row-major) holding the centre of each position of an h x w grid."""
    rows = jnp.floor((jnp.arange(h) + 0.5) * 3 / h).astype(jnp.int32)
    cols = jnp.floor((jnp.arange(w) + 0.5) * 3 / w).astype(jnp.int32)
    return 3 * rows[:, None] + cols[None, :]


class AttributeHead(nn.Module):
    """A training-only probe on the backbone's tokens: logits of the shape and colour of the object in
    each token's 3x3-grid cell (REPA-style representation alignment, with the shapes world's free
    labels as the teacher). Never exported: the sampler does not use it."""

    hidden: int

    @nn.compact
    def __call__(self, tokens_BxLxD: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="norm")(tokens_BxLxD.astype(jnp.float32))  # fp32: a loss head
        h = nn.silu(nn.Dense(self.hidden, name="fc1")(h))
        return nn.Dense(NUM_SHAPE_CLASSES + NUM_COLOUR_CLASSES, name="fc2")(h)


def attribute_loss(logits_BxLxK: jax.Array, attrs_Bx9x2: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Mean over tokens of the shape and colour cross-entropies against the token's cell labels (fp32).

    Args:
      logits_BxLxK: `AttributeHead` logits of the h x w token grid (row-major), K = 9 + 11.
      attrs_Bx9x2: per cell (1 + shape index, 1 + colour index), 0 for an empty cell.
      grid_hw: the token grid (h, w).
    """
    idx = grid_cells(*grid_hw).reshape(-1)
    labels = jnp.asarray(attrs_Bx9x2, jnp.int32)[:, idx]  # (B, L, 2)
    logits = logits_BxLxK.astype(jnp.float32)
    shape = optax.softmax_cross_entropy_with_integer_labels(logits[..., :NUM_SHAPE_CLASSES], labels[..., 0])
    colour = optax.softmax_cross_entropy_with_integer_labels(logits[..., NUM_SHAPE_CLASSES:], labels[..., 1])
    return jnp.mean(shape + colour)
