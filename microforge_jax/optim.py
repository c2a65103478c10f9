"""Optimizers and the parameter EMA.

AdamW with linear warm-up and cosine decay, gradient clipping by global norm (2.0 in the seed's
failure-mode table), no weight decay on vectors (norms, biases, gates), and a separate learning
rate for the SSM parameters (the BiSSM's direction-owned conv, x_proj, dt_proj, A_log and D).
Works on boxed (logically partitioned) parameter trees, so the optimizer state inherits the
parameters' logical axes and is sharded like them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _names(path: tuple[Any, ...]) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def is_ssm_param(path: tuple[Any, ...]) -> bool:
    """The selective-scan parameters: those a BiSSM direction owns (`fwd_*`, `bwd_*`)."""
    return any(n.startswith(("fwd_", "bwd_")) for n in _names(path))


def param_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: "ssm" if is_ssm_param(p) else "other", params)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1), end_value=0.1 * lr
    )


def make_optimizer(hp: Any) -> optax.GradientTransformation:
    """The optimizer of a stage from its hyper-parameters (`config.train.<stage>`).

    Uses `lr`, `warmup_steps`, `steps`, `weight_decay`, `grad_clip` and, when present and not 1,
    `ssm_lr_mult` (the SSM parameters' learning rate relative to the others).
    """
    sched = schedule(hp.lr, hp.warmup_steps, hp.steps)

    def adamw(mult: float) -> optax.GradientTransformation:
        return optax.adamw(
            lambda step: mult * sched(step), b1=0.9, b2=0.99, weight_decay=hp.weight_decay, mask=decay_mask
        )

    mult = float(hp.get("ssm_lr_mult", 1.0))
    inner = (
        adamw(1.0) if mult == 1.0 else optax.multi_transform({"ssm": adamw(mult), "other": adamw(1.0)}, param_labels)
    )
    return optax.chain(optax.clip_by_global_norm(hp.grad_clip), inner)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay of the update after `step` updates: min(decay, step / (1 + step)).

    Until `step / (1 + step)` reaches `decay` the EMA is the running mean of the parameters after
    each update, so a short stage still averages; from step `decay / (1 - decay)` on (199 for
    0.995) the decay is `decay` itself.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, step / (1.0 + step))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    d = ema_decay(step, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
