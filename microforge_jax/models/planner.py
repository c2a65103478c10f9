"""The Recurrent Latent Planner (after RIN, arXiv 2212.11972).

`num_tokens` plan tokens of the backbone's width:

* start: `p = sigmoid(w) * p_prev + (1 - sigmoid(w)) * p_init(text)` — the gated mix of the
  tokens the planner produced at the previous (noisier) sampling step and a text-derived
  initialisation, with one learned scalar `w`; `p_init` alone when there is no previous state;
* READ: cross-attention from the plan tokens to the noisy latent tokens, O(K * N);
* REASON: self-attention among the plan tokens, O(K^2), then an FFN;

repeated `depth` times. The output tokens go to the backbone's cross-attention and are the state
carried to the next step. Training mirrors RIN's self-conditioning: for about half of a batch the
planner first runs with no previous state, the result is stop-gradiented and fed back as
`prev_BxKxD` with `has_prev_B` True (see `train_lib`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax import axes
from microforge_jax.config import PlannerConfig
from microforge_jax.models import layers
from microforge_jax.models.vae import pixel_unshuffle

Dtype = Any


class Planner(nn.Module):
    """Plan tokens (B, K, D) from the noisy latent, the time, the text and the previous plan."""

    cfg: PlannerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        z_BxhxwxC: jax.Array,
        t_B: jax.Array,
        pooled_BxE: jax.Array,
        prev_BxKxD: jax.Array | None = None,
        has_prev_B: jax.Array | None = None,
    ) -> jax.Array:
        """Returns the new plan tokens (B, K, D).

        Args:
          z_BxhxwxC: the noisy target latent the planner READs.
          t_B: flow time in [0, 1].
          pooled_BxE: the pooled text embedding that initialises the plan.
          prev_BxKxD: the plan tokens of the previous sampling step, or None (first step).
          has_prev_B: per example, whether `prev_BxKxD` is used (False: `p_init` alone); None
            means all True when `prev_BxKxD` is given.
        """
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if z_BxhxwxC.ndim != 4 or z_BxhxwxC.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"planner expects a latent of shape (batch, h, w, {cfg.latent_channels}), got {tuple(z_BxhxwxC.shape)}"
            )
        b, h, w, _ = z_BxhxwxC.shape
        d, k = cfg.dim, cfg.num_tokens
        heads = max(1, d // cfg.head_dim)

        # ---- p_init(text): learned tokens shifted by a projection of the pooled text
        tokens = layers.param(self, "plan_init", nn.initializers.normal(0.02), (k, d), (axes.TOKENS, axes.EMBED))
        text_shift = layers.dense(d, (None, axes.EMBED), name="init_proj", **kw)(pooled_BxE.astype(self.dtype))
        p_init = tokens[None].astype(self.dtype) + text_shift[:, None]
        p = p_init
        if prev_BxKxD is not None:
            if prev_BxKxD.shape != (b, k, d):
                raise ValueError(f"previous plan must have shape {(b, k, d)}, got {tuple(prev_BxKxD.shape)}")
            w_gate = layers.param(self, "carry_gate", layers.zeros, (), (), self.param_dtype)
            keep = jax.nn.sigmoid(w_gate.astype(jnp.float32)).astype(self.dtype)
            mixed = keep * prev_BxKxD.astype(self.dtype) + (1 - keep) * p_init
            p = mixed if has_prev_B is None else jnp.where(has_prev_B[:, None, None], mixed, p_init)
        else:
            # Create the gate at init time even on the first-step path, so both paths share params.
            layers.param(self, "carry_gate", layers.zeros, (), (), self.param_dtype)

        # ---- the time tells the planner how noisy what it reads is
        t_emb = layers.timestep_embedding(t_B, 256)
        t_emb = layers.dense(d, (None, axes.EMBED), name="t_fc1", **kw)(t_emb)
        p = p + layers.dense(d, (axes.MLP, axes.EMBED), name="t_fc2", **kw)(nn.silu(t_emb))[:, None]

        r = cfg.patch_size  # READ tokens are r x r patches of latent cells (pixel space: 8 x 8 pixels)
        if h % r or w % r:
            raise ValueError(f"latent height and width must be multiples of model.planner.patch_size={r}, got {h}x{w}")
        cells = pixel_unshuffle(z_BxhxwxC.astype(self.dtype), r) if r > 1 else z_BxhxwxC.astype(self.dtype)
        h, w = h // r, w // r
        latent = layers.dense(d, (None, axes.EMBED), name="latent_proj", **kw)(cells)
        latent = latent.reshape(b, h * w, d) + layers.sincos_2d(h, w, d).astype(self.dtype)[None]
        latent = layers.layer_norm(name="latent_norm", **kw)(latent)
        for i in range(cfg.depth):
            read = layers.Attention(heads, cfg.head_dim, name=f"read{i}", **kw)
            p = p + read(layers.layer_norm(name=f"read{i}_norm", **kw)(p), latent)
            reason = layers.Attention(heads, cfg.head_dim, name=f"reason{i}", **kw)
            p = p + reason(layers.layer_norm(name=f"reason{i}_norm", **kw)(p))
            p = p + layers.Mlp(3 * d, name=f"ffn{i}", **kw)(layers.layer_norm(name=f"ffn{i}_norm", **kw)(p))
        p = layers.layer_norm(name="out_norm", **kw)(p)
        return nn.with_logical_constraint(p, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


def plan_diversity_loss(plan_BxKxD: jax.Array) -> jax.Array:
    """Mean squared cosine similarity between distinct plan tokens (against planner collapse).

    0 when the K tokens of each example are mutually orthogonal, 1 when they all coincide.
    """
    p = plan_BxKxD.astype(jnp.float32)
    p = p / (jnp.linalg.norm(p, axis=-1, keepdims=True) + 1e-6)
    sim = jnp.einsum("bkd,bjd->bkj", p, p)
    k = p.shape[1]
    off = sim * (1.0 - jnp.eye(k))[None]
    return jnp.sum(jnp.square(off)) / (p.shape[0] * max(k * (k - 1), 1))
