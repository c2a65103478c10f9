"""The denoiser: the Recurrent Latent Planner and the backbone, as one module.

`Denoiser.__call__` runs the planner (unless ablated, A1) then the backbone, returning the
velocity and the new plan tokens: the plan is the state a sampler carries from step to step.
`plan` and `velocity` are exposed separately for the trainer's self-conditioning pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax.config import ModelConfig
from microforge_jax.models.backbone import Backbone
from microforge_jax.models.planner import Planner

Dtype = Any
TASKS = ("generate", "edit", "inpaint", "sr")


def task_id(name: str) -> int:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    return TASKS.index(name)


class Text(NamedTuple):
    """What the backbone sees of the text: tokens (B, M, E), mask (B, M), pooled (B, E)."""

    tokens: jax.Array
    mask: jax.Array
    pooled: jax.Array


class Denoiser(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone = Backbone(self.cfg.backbone, **kw)
        if self.cfg.backbone.use_planner:
            self.planner = Planner(self.cfg.planner, **kw)

    def plan(
        self,
        z_BxhxwxC: jax.Array,
        t_B: jax.Array,
        text: Text,
        prev_BxKxD: jax.Array | None = None,
        has_prev_B: jax.Array | None = None,
    ) -> jax.Array | None:
        if not self.cfg.backbone.use_planner:
            return None
        return self.planner(z_BxhxwxC, t_B, text.pooled, prev_BxKxD, has_prev_B)

    def velocity(
        self,
        z_BxhxwxC: jax.Array,
        t_B: jax.Array,
        text: Text,
        plan_BxKxD: jax.Array | None,
        task_B: jax.Array | None = None,
        source_BxhxwxC: jax.Array | None = None,
    ) -> jax.Array:
        return self.backbone(
            z_BxhxwxC,
            t_B,
            text.tokens,
            text.mask,
            text.pooled,
            plan_BxKxD=plan_BxKxD,
            task_B=task_B,
            source_BxhxwxC=source_BxhxwxC,
        )

    def __call__(
        self,
        z_BxhxwxC: jax.Array,
        t_B: jax.Array,
        text: Text,
        *,
        task_B: jax.Array | None = None,
        source_BxhxwxC: jax.Array | None = None,
        prev_plan_BxKxD: jax.Array | None = None,
        has_prev_B: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Returns (velocity (B, h, w, C), plan tokens (B, K, D) or None when ablated)."""
        plan = self.plan(z_BxhxwxC, t_B, text, prev_plan_BxKxD, has_prev_B)
        return self.velocity(z_BxhxwxC, t_B, text, plan, task_B, source_BxhxwxC), plan


def build_denoiser(cfg: ModelConfig, dtype: Dtype | None = None) -> Denoiser:
    return Denoiser(cfg, dtype=jnp.dtype(dtype or cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
