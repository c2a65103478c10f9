"""Layer factories that put logical axis names, a compute dtype and a param dtype on every layer.

Each factory returns a plain Flax layer (so parameter names stay `name/kernel`, `name/bias`,
`name/scale`), with its initialisers wrapped in `nn.with_logical_partitioning`. Model code calls
these instead of `nn.Dense`/`nn.Conv`/`nn.GroupNorm` directly.

Defaults are chosen to mirror PyTorch exactly (the export converter relies on it): GELU is the
exact erf form, and every norm states its epsilon.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax import axes

Dtype = Any
Initializer = Callable[..., jax.Array]

# torch.nn.GELU() default: the exact erf form (flax's default is the tanh approximation).
gelu = functools.partial(nn.gelu, approximate=False)

default_kernel_init = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def dense(
    features: int,
    names: tuple[str, str],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = zeros,
    precision: Any = None,
    name: str | None = None,
) -> nn.Dense:
    """A `nn.Dense` whose kernel carries logical axes `names` = (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(bias_init, names[-1:]),
        name=name,
    )


def conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    feature_group_count: int = 1,
    strides: int | Sequence[int] = 1,
    use_bias: bool = True,
    padding: Any = "SAME",
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = zeros,
    names: tuple[str, ...] | None = None,
    precision: Any = None,
    name: str | None = None,
) -> nn.Conv:
    """A `nn.Conv` (NHWC, HWIO kernel) with logical axes on its kernel and bias."""
    if names is None:
        spatial = (axes.CONV_H, axes.CONV_W, axes.CONV_H)[: len(kernel_size)]
        names = (*spatial, axes.CONV_IN, axes.CONV_OUT)
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=padding,
        feature_group_count=feature_group_count,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(bias_init, names[-1:]),
        name=name,
    )


def group_norm(
    num_groups: int, *, dtype: Dtype, param_dtype: Dtype, epsilon: float = 1e-6, name: str | None = None
) -> nn.GroupNorm:
    """GroupNorm; statistics are computed in fp32 (Flax promotes reductions)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(ones, (axes.NORM,)),
        bias_init=nn.with_logical_partitioning(zeros, (axes.NORM,)),
        name=name,
    )


def layer_norm(
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    epsilon: float = 1e-6,
    use_scale: bool = True,
    use_bias: bool = True,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm over the last axis; statistics in fp32."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_scale=use_scale,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(ones, (axes.NORM,)),
        bias_init=nn.with_logical_partitioning(zeros, (axes.NORM,)),
        name=name,
    )


def param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    names: tuple[str | None, ...],
    param_dtype: Dtype = jnp.float32,
) -> jax.Array:
    """`module.param` with logical axes, for raw parameters (A_log, plan tokens, gates)."""
    return module.param(name, nn.with_logical_partitioning(init, names), tuple(shape), param_dtype)


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count: the largest divisor of `channels` not above `max_groups`."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def dot_product_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    mask_BxLxS: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention; `k`/`v` may carry 1 head (multi-query) and broadcast.

    The logits and softmax are computed in fp32 (bf16 softmax loses small probabilities).
    A boolean mask is True where attending is allowed.
    """
    batch, _, heads, depth = q_BxLxHxK.shape
    k_BxSxHxK = jnp.broadcast_to(k_BxSxHxK, (batch, k_BxSxHxK.shape[1], heads, depth))
    v_BxSxHxK = jnp.broadcast_to(v_BxSxHxK, (batch, v_BxSxHxK.shape[1], heads, depth))
    q = q_BxLxHxK.astype(jnp.float32) / jnp.sqrt(jnp.float32(depth))
    logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q, k_BxSxHxK.astype(jnp.float32))
    if mask_BxLxS is not None:
        big_neg = jnp.finfo(jnp.float32).min
        logits_BxHxLxS = jnp.where(mask_BxLxS[:, None], logits_BxHxLxS, big_neg)
    probs = jax.nn.softmax(logits_BxHxLxS, axis=-1)
    out = jnp.einsum("bhls,bshk->blhk", probs, v_BxSxHxK.astype(jnp.float32))
    return out.astype(q_BxLxHxK.dtype)


class Attention(nn.Module):
    """Multi-head attention from `x` to `context` (self-attention when `context` is None).

    `kv_heads=1` is multi-query attention (one shared key/value head, as in SharedMQA and the
    cross-attention, which keeps the KV projections and cache small on phones).
    Parameters: `q`, `k`, `v`, `out`.
    """

    num_heads: int
    head_dim: int = 64
    kv_heads: int | None = None  # None: as many as query heads
    out_init: Initializer = default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, context_BxSxE: jax.Array | None = None, mask_BxS: jax.Array | None = None
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x_BxLxD if context_BxSxE is None else context_BxSxE
        kv_heads = self.kv_heads or self.num_heads
        b, length, d = x_BxLxD.shape
        q = dense(self.num_heads * self.head_dim, (axes.EMBED, axes.HEADS), name="q", **kw)(x_BxLxD)
        k = dense(kv_heads * self.head_dim, (axes.EMBED, axes.KV), name="k", **kw)(context)
        v = dense(kv_heads * self.head_dim, (axes.EMBED, axes.KV), name="v", **kw)(context)
        q = q.reshape(b, length, self.num_heads, self.head_dim)
        k = k.reshape(b, context.shape[1], kv_heads, self.head_dim)
        v = v.reshape(b, context.shape[1], kv_heads, self.head_dim)
        mask = (
            None if mask_BxS is None else jnp.broadcast_to(mask_BxS[:, None, :].astype(bool), (b, length, k.shape[1]))
        )
        out = dot_product_attention(q, k, v, mask).reshape(b, length, self.num_heads * self.head_dim)
        return dense(d, (axes.HEADS, axes.EMBED), kernel_init=self.out_init, name="out", **kw)(out)


class Mlp(nn.Module):
    """Dense -> GELU (erf) -> Dense. Parameters: `fc1`, `fc2`."""

    hidden: int
    out_init: Initializer = default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = gelu(dense(self.hidden, (axes.EMBED, axes.MLP), name="fc1", **kw)(x))
        return dense(x.shape[-1], (axes.MLP, axes.EMBED), kernel_init=self.out_init, name="fc2", **kw)(h)


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] (scaled to [0, 1000]): (B,) -> (B, dim), in fp32."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t_B.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_2d(height: int, width: int, dim: int) -> jax.Array:
    """2-D sin-cos position embedding for any grid, (H*W, dim) in raster order, fp32.

    Half the channels encode the row, half the column (each as sin/cos at dim/4 frequencies),
    so it works at any grid size, including the [target | source] grid of editing.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    out_r = rows.reshape(-1)[:, None] * omega[None]
    out_c = cols.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(out_r), jnp.cos(out_r), jnp.sin(out_c), jnp.cos(out_c)], axis=-1)
