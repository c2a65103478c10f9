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
