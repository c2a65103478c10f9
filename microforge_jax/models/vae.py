"""The deep-compression VAE (after DC-AE, arXiv 2410.10733), NHWC throughout.

Every resolution change carries a parameter-free residual shortcut:

* downsample: `conv3x3 -> pixel_unshuffle(2)` plus `pixel_unshuffle(x)` averaged over groups of
  consecutive channels down to the output width;
* upsample: `conv3x3 -> pixel_shuffle(2)` plus `x` with each channel repeated, pixel-shuffled.

The space-to-channel order is PyTorch's, `b (h r1) (w r2) c -> b h w (c r1 r2)` (input channel
outermost), so the PyTorch mirror's `F.pixel_unshuffle` / `F.pixel_shuffle` match with no
reindexing. The latent heads use the same idea at factor 1: average the encoder's last width down
to `2 C` (mean, log-variance), and repeat the `C` latent channels up on decode.

Stage widths: the config's channel list, its last width repeated until there are
`log2(factor) + 1` stages (f32 with 4 widths -> 6 stages, 5 downsamples).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from microforge_jax import axes, vae_slicing
from microforge_jax.config import VAEConfig
from microforge_jax.models import layers

Dtype = Any


# ----------------------------------------------------------------------------- shortcuts


def pixel_unshuffle(x_BxHxWxC: jax.Array, r: int = 2) -> jax.Array:
    """Space-to-channel in PyTorch's channel order: (B, H*r, W*r, C) -> (B, H, W, C*r*r)."""
    return rearrange(x_BxHxWxC, "b (h r1) (w r2) c -> b h w (c r1 r2)", r1=r, r2=r)


def pixel_shuffle(x_BxHxWxC: jax.Array, r: int = 2) -> jax.Array:
    """Channel-to-space in PyTorch's channel order: (B, H, W, C*r*r) -> (B, H*r, W*r, C)."""
    return rearrange(x_BxHxWxC, "b h w (c r1 r2) -> b (h r1) (w r2) c", r1=r, r2=r)


def channel_average(x: jax.Array, out_channels: int) -> jax.Array:
    """Averages groups of consecutive channels: (..., out * g) -> (..., out)."""
    c = x.shape[-1]
    if c % out_channels:
        raise ValueError(f"cannot average {c} channels down to {out_channels}")
    return x.reshape(*x.shape[:-1], out_channels, c // out_channels).mean(-1)


def channel_repeat(x: jax.Array, out_channels: int) -> jax.Array:
    """Repeats each channel consecutively (torch's repeat_interleave): (..., c) -> (..., out)."""
    c = x.shape[-1]
    if out_channels % c:
        raise ValueError(f"cannot repeat {c} channels up to {out_channels}")
    return jnp.repeat(x, out_channels // c, axis=-1)


def downsample_shortcut(x: jax.Array, out_channels: int) -> jax.Array:
    return channel_average(pixel_unshuffle(x), out_channels)


def upsample_shortcut(x: jax.Array, out_channels: int) -> jax.Array:
    return pixel_shuffle(channel_repeat(x, out_channels * 4))


# ----------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the identity."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = layers.num_groups(self.channels)
        h = nn.silu(layers.group_norm(g, name="norm1", **kw)(x))
        h = layers.conv(self.channels, (3, 3), name="conv1", **kw)(h)
        h = nn.silu(layers.group_norm(g, name="norm2", **kw)(h))
        h = layers.conv(self.channels, (3, 3), name="conv2", **kw)(h)
        return x + h


class Downsample(nn.Module):
    """conv3x3 to out/4 channels -> pixel_unshuffle(2), plus the averaging shortcut."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.conv(self.out_channels // 4, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return pixel_unshuffle(h) + downsample_shortcut(x, self.out_channels)


class Upsample(nn.Module):
    """conv3x3 to 4*out channels -> pixel_shuffle(2), plus the repeating shortcut."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.conv(self.out_channels * 4, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return pixel_shuffle(h) + upsample_shortcut(x, self.out_channels)


class Encoder(nn.Module):
    """Image (B, H, W, 3) in [-1, 1] -> moments (B, H/f, W/f, 2C)."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = self.cfg.stage_channels
        h = layers.conv(widths[0], (3, 3), name="conv_in", **kw)(x.astype(self.dtype))
        for i, width in enumerate(widths):
            for j in range(self.cfg.encoder_blocks):
                h = ResBlock(width, name=f"stage{i}_block{j}", **kw)(h)
            if i + 1 < len(widths):
                h = Downsample(widths[i + 1], name=f"stage{i}_down", **kw)(h)
            h = nn.with_logical_constraint(h, (axes.BATCH, axes.HEIGHT, axes.WIDTH, None))
        moments = 2 * self.cfg.latent_channels
        out = nn.silu(layers.group_norm(layers.num_groups(widths[-1]), name="norm_out", **kw)(h))
        out = layers.conv(moments, (3, 3), name="conv_out", **kw)(out)
        return out + channel_average(h, moments)


class Decoder(nn.Module):
    """Latent (B, h, w, C) -> image (B, h*f, w*f, 3)."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = self.cfg.stage_channels
        z = z.astype(self.dtype)
        h = layers.conv(widths[-1], (3, 3), name="conv_in", **kw)(z) + channel_repeat(z, widths[-1])
        for i in reversed(range(len(widths))):
            for j in range(self.cfg.decoder_blocks):
                h = ResBlock(widths[i], name=f"stage{i}_block{j}", **kw)(h)
            if i > 0:
                h = Upsample(widths[i - 1], name=f"stage{i}_up", **kw)(h)
            h = nn.with_logical_constraint(h, (axes.BATCH, axes.HEIGHT, axes.WIDTH, None))
        h = nn.silu(layers.group_norm(layers.num_groups(widths[0]), name="norm_out", **kw)(h))
        return layers.conv(3, (3, 3), name="conv_out", **kw)(h)


# ----------------------------------------------------------------------------- posterior


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), in fp32; a pytree, so jit can return it."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # fp32: exp(logvar)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over the latent, per example: (B,)."""
        kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return kl.reshape(kl.shape[0], -1).sum(-1)


PIXEL_LOGVAR = -30.0  # the pixel "posterior": std 3e-7, the lower clip of every posterior's log-variance


class DCVAE(nn.Module):
    """Deep-compression VAE: `encode` -> DiagonalGaussian, `decode` -> image, `__call__` both.

    Images are NHWC in [-1, 1]; height and width must be multiples of `cfg.downsample_factor`.
    With `cfg.kind == "pixel"` it has no parameters: the posterior is the image itself (a point mass)
    and `decode` returns the latent, so trainer, sampler and export treat pixel space as a VAE.
    """

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.cfg.kind == "pixel":
            return
        self.encoder = Encoder(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        self.decoder = Decoder(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype)

    def _check(self, shape: tuple[int, ...], factor: int, channels: int, what: str) -> None:
        if len(shape) != 4 or shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {tuple(shape)}")
        h, w = shape[1:3]
        if h % factor or w % factor:
            raise ValueError(
                f"{what} height and width must be multiples of {factor} (the VAE's compression factor), got {h}x{w}"
            )

    def encode(self, image_BxHxWx3: jax.Array) -> DiagonalGaussian:
        self._check(image_BxHxWx3.shape, self.cfg.downsample_factor, 3, "image")
        if self.cfg.kind == "pixel":
            x = image_BxHxWx3.astype(jnp.float32)
            return DiagonalGaussian(x, jnp.full_like(x, PIXEL_LOGVAR))
        return DiagonalGaussian.from_moments(self.encoder(image_BxHxWx3))

    def decode(self, z_BxhxwxC: jax.Array) -> jax.Array:
        self._check(z_BxhxwxC.shape, 1, self.cfg.latent_channels, "latent")
        if self.cfg.kind == "pixel":
            return z_BxhxwxC.astype(jnp.float32)
        return self.decoder(z_BxhxwxC).astype(jnp.float32)

    def __call__(self, image_BxHxWx3: jax.Array, *, rng: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction (the posterior sample with `rng`, its mode without) and the posterior."""
        posterior = self.encode(image_BxHxWx3)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), posterior


def map_slices(fn, x: jax.Array, size: int | None = None, *, upscale: int = 1):
    """`fn(x)` computed `size` rows at a time: a `lax.map` over equal slices of axis 0 (VAE slicing).

    `fn` must treat rows independently (the VAE does: its GroupNorms are per image); its output, any
    pytree of arrays with a leading batch axis, equals `fn(x)`'s up to float rounding. Forward passes
    only: autodiff through the map is far slower than through `fn(x)` (the frozen encode in the flow
    step and the sampler's decode are the callers). `size=None`: `auto_slice_size(x, upscale)`.
    """
    size = auto_slice_size(x, upscale) if size is None else size
    b = x.shape[0]
    if size >= b:
        return fn(x)
    if size < 1 or b % size:
        raise ValueError(f"VAE slice size {size} must divide the batch of {b}")
    out = jax.lax.map(fn, x.reshape(b // size, size, *x.shape[1:]))
    return jax.tree.map(lambda y: y.reshape(b, *y.shape[2:]), out)


def auto_slice_size(x_BxHxWxC: jax.Array, upscale: int = 1) -> int:
    """`vae_slicing.slice_size` for the NHWC batch `x` on this process's default backend and device count.

    `upscale`: output pixels per pixel of `x` (f * f when `x` is a latent to decode).
    """
    b, h, w = x_BxHxWxC.shape[:3]
    cpu = jax.default_backend() == "cpu"
    return vae_slicing.slice_size(b, h * w * upscale, cpu=cpu, devices=jax.device_count())


def build_vae(cfg, dtype: Dtype | None = None) -> DCVAE:
    """The VAE of a `ModelConfig`."""
    return DCVAE(cfg.vae, dtype=jnp.dtype(dtype or cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


# ----------------------------------------------------------------------------- tiled decode


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of `tile` cells covering `size`, neighbours sharing >= `overlap`.

    The starts are spread evenly (so every overlap is about the same); one tile when `tile >= size`.
    """
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"the tile overlap must be in [0, {tile}), got {overlap}")
    n = 1 + -(-(size - tile) // (tile - overlap))
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def blend_weights(starts: list[int], tile: int, size: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D blending weights in pixels: per tile (num_tiles, tile * factor) and their sum over tiles (size * factor,).

    A tile's weight is a trapezoid: 1 except where it overlaps a neighbour, where it ramps linearly
    (`(k + 0.5) / overlap_px`) towards its edge. Outside overlaps the pixel has one tile of weight 1.
    """
    n = tile * factor
    k = np.arange(n, dtype=np.float64) + 0.5
    ws, total = [], np.zeros(size * factor)
    for i, s in enumerate(starts):
        w = np.ones(n)
        if i > 0:
            ov = (starts[i - 1] + tile - s) * factor
            w = np.minimum(w, k / ov) if ov > 0 else w
        if i + 1 < len(starts):
            ov = (s + tile - starts[i + 1]) * factor
            w = np.minimum(w, (n - k) / ov) if ov > 0 else w
        ws.append(w)
        total[s * factor : s * factor + n] += w
    return np.stack(ws).astype(np.float32), total.astype(np.float32)


def decode_tiled(vae: nn.Module, variables, z_BxhxwxC: jax.Array, tile: int, overlap: int = 2, decode_fn=None):
    """VAE decode in overlapping latent tiles, blended linearly: the peak memory of one tile's decode.

    Tiles of `tile` x `tile` latent cells (evenly spread, neighbours overlapping by >= `overlap`
    cells) are decoded one after another inside a `lax.scan` (so one tile's activations are alive at
    a time), weighted by separable trapezoids that ramp linearly across each overlap, summed and
    divided by the summed weights. `tile <= 0` or a tile covering the latent is `vae.decode` itself.

    Not exact in general: the decoder's GroupNorms normalise over the whole (tile) image and its
    convs zero-pad at a tile's border, so a tile's pixels differ from the untiled decode's (see
    `tests/test_bench_parts.py`); with a spatially local decoder the result equals the untiled decode
    exactly away from the overlaps.

    Args:
      vae: the DCVAE (any module whose `decode` maps (B, t, t, C) -> (B, t f, t f, 3)).
      variables: its variables (`{"params": ...}`).
      z_BxhxwxC: the latent.
      tile: tile side in latent cells (<= 0: untiled).
      overlap: minimum overlap of neighbouring tiles in latent cells.
      decode_fn: `(variables, z) -> image` override (default `vae.apply(..., method="decode")`).

    Returns:
      (B, h f, w f, 3) fp32.
    """
    decode = decode_fn or (lambda v, z: vae.apply(v, z, method="decode"))
    b, h, w, c = z_BxhxwxC.shape
    if tile <= 0 or (tile >= h and tile >= w):
        return decode(variables, z_BxhxwxC).astype(jnp.float32)
    th, tw = min(tile, h), min(tile, w)
    rows, cols = tile_starts(h, th, min(overlap, th - 1)), tile_starts(w, tw, min(overlap, tw - 1))
    out = jax.eval_shape(lambda z: decode(variables, z), jax.ShapeDtypeStruct((b, th, tw, c), z_BxhxwxC.dtype))
    f = out.shape[1] // th
    (wr, tr), (wc, tc) = blend_weights(rows, th, h, f), blend_weights(cols, tw, w, f)
    ri, ci = (x.reshape(-1) for x in np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij"))
    xs = (
        jnp.asarray(np.asarray(rows)[ri] * f),
        jnp.asarray(np.asarray(cols)[ci] * f),
        jnp.asarray(wr[ri]),
        jnp.asarray(wc[ci]),
    )

    used = variables
    if isinstance(variables, dict) and "decoder" in variables.get("params", {}):
        used = {"params": {"decoder": variables["params"]["decoder"]}}  # the encoder's are not needed

    def body(acc, x):
        r0, c0, w_r, w_c = x
        zt = jax.lax.dynamic_slice(z_BxhxwxC, (0, r0 // f, c0 // f, 0), (b, th, tw, c))
        # Tied to the tile, the weights stay loop-variant: XLA would otherwise hoist their casts
        # (CPU computes bf16 convs in fp32) out of the loop and keep fp32 copies alive throughout.
        tile_vars, zt = jax.lax.optimization_barrier((used, zt))
        img = decode(tile_vars, zt).astype(jnp.float32) * (w_r[:, None] * w_c[None, :])[None, :, :, None]
        cur = jax.lax.dynamic_slice(acc, (0, r0, c0, 0), img.shape)
        return jax.lax.dynamic_update_slice(acc, cur + img, (0, r0, c0, 0)), None

    acc = jnp.zeros((b, h * f, w * f, out.shape[-1]), jnp.float32)
    acc = jax.lax.scan(body, acc, xs)[0]
    return acc / jnp.asarray(tr[:, None] * tc[None, :])[None, :, :, None]
