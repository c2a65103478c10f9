"""The SSM-Conv hybrid backbone: predicts the rectified-flow velocity of a latent.

Per block (x depth): AdaLN-Group modulation from `t_emb + pooled_text + task`, a BiSSM mixer
(zigzag bidirectional selective scan with a depthwise conv), cross-attention from the image
tokens to `[text tokens ; plan tokens]`, and an FFN with expansion 3. One SharedMQA block (a
single parameter set) is applied after every `shared_attn_every` blocks. Every residual branch is
gated by a zero-initialised gate, so at initialisation each block is the identity.

Editing by concatenation (DreamLite): with a source latent the token grid is
`[z_target | z_source]` along the width (h, 2w), a learned segment embedding tells the halves
apart, and only the target half is predicted. Generate runs without a source half (grid (h, w)):
the conv, the scan paths and the 2-D sin-cos positions work at any grid size, and training and
sampling use the same layout per task.

Ablations (numbered as in the original design): `use_planner` (A1), `mixer="attention"` (A2),
`use_shared_attn` (A3), `use_dwconv` (A4, inside the BiSSM), `adaln="full"` (A6).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax import axes
from microforge_jax.config import BackboneConfig
from microforge_jax.models import layers
from microforge_jax.models.ssm import BiSSM
from microforge_jax.models.vae import pixel_shuffle, pixel_unshuffle

Dtype = Any
NUM_TASKS = 4  # generate, edit, inpaint, sr
NUM_MOD = 6  # shift/scale/gate for the mixer and for the FFN
# x-prediction: the smallest t the velocity (z_t - x0) / t divides by (JiT's clip of 1 - t at 0.05)
X_PRED_MIN_T = 0.05
_init_tokens = nn.initializers.normal(0.02)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None]) + shift[:, None]


def _ln(name: str, dtype: Dtype, param_dtype: Dtype, affine: bool = False) -> nn.LayerNorm:
    return layers.layer_norm(
        dtype=dtype, param_dtype=param_dtype, use_scale=affine, use_bias=affine, epsilon=1e-6, name=name
    )


class SharedMQA(nn.Module):
    """Multi-query self-attention over all image tokens, gated; one instance shared by all uses."""

    cfg: BackboneConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _ln("norm", affine=True, **kw)(x_BxLxD)
        h = layers.Attention(self.cfg.num_heads, self.cfg.head_dim, kv_heads=1, name="attn", **kw)(h)
        gate_init = nn.initializers.constant(self.cfg.shared_gate_init)
        gate = layers.param(self, "gate", gate_init, (x_BxLxD.shape[-1],), (axes.EMBED,), self.param_dtype)
        return x_BxLxD + gate.astype(h.dtype) * h


class HybridBlock(nn.Module):
    """AdaLN-modulated mixer (BiSSM or, for A2, self-attention) -> cross-attention -> FFN."""

    cfg: BackboneConfig
    layer_index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mod_Bx6xD: jax.Array,
        context_BxSxD: jax.Array,
        context_mask_BxS: jax.Array,
        grid_hw: tuple[int, int],
    ) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x_BxLxD.shape[-1]
        # A per-block offset on the group's shared modulation (zero at init), so blocks of one
        # AdaLN group can still differ.
        offset = layers.param(self, "mod_offset", layers.zeros, (NUM_MOD, d), (None, axes.EMBED), self.param_dtype)
        mod = (mod_Bx6xD + offset[None]).astype(self.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i] for i in range(NUM_MOD))

        h = modulate(_ln("norm1", **kw)(x_BxLxD), shift1, scale1)
        if cfg.mixer == "bissm":
            h = BiSSM(cfg, layer_index=self.layer_index, name="mixer", **kw)(h, grid_hw)
        else:
            h = layers.Attention(cfg.num_heads, cfg.head_dim, name="mixer", **kw)(h)
        x = x_BxLxD + gate1[:, None] * h

        h = _ln("norm2", affine=True, **kw)(x)
        h = layers.Attention(cfg.num_heads, cfg.head_dim, kv_heads=1, name="cross_attn", **kw)(
            h, context_BxSxD, context_mask_BxS
        )
        gate_init = nn.initializers.constant(cfg.cross_gate_init)
        cross_gate = layers.param(self, "cross_gate", gate_init, (d,), (axes.EMBED,), self.param_dtype)
        x = x + cross_gate.astype(h.dtype) * h

        h = modulate(_ln("norm3", **kw)(x), shift2, scale2)
        h = layers.Mlp(cfg.ffn_expand * d, name="ffn", **kw)(h)
        x = x + gate2[:, None] * h
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


class Backbone(nn.Module):
    """Velocity prediction: (z_t, t, text, plan, task[, source]) -> v with z_t's shape."""

    cfg: BackboneConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self, z, text, text_mask, pooled, plan, source, task):
        cfg = self.cfg
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"backbone expects a latent of shape (batch, h, w, {cfg.latent_channels}), got {tuple(z.shape)}"
            )
        p = cfg.patch_size
        if z.shape[1] % p or z.shape[2] % p:
            raise ValueError(
                f"latent height and width must be multiples of model.backbone.patch_size={p}, got {z.shape[1]}x{z.shape[2]}"
            )
        if source is not None and source.shape != z.shape:
            raise ValueError(f"source latent shape {tuple(source.shape)} must equal the target's {tuple(z.shape)}")
        b = z.shape[0]
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text tokens must have shape ({b}, M, {cfg.text_dim}), got {tuple(text.shape)}")
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text mask shape {tuple(text_mask.shape)} must be {tuple(text.shape[:2])}")
        if pooled.shape != (b, cfg.text_dim):
            raise ValueError(f"pooled text must have shape ({b}, {cfg.text_dim}), got {tuple(pooled.shape)}")
        if cfg.use_planner and plan is None:
            raise ValueError("this backbone uses the planner (model.backbone.use_planner): pass plan tokens")
        if plan is not None and (plan.ndim != 3 or plan.shape[0] != b or plan.shape[-1] != cfg.dim):
            raise ValueError(f"plan tokens must have shape ({b}, K, {cfg.dim}), got {tuple(plan.shape)}")
        if task is not None and task.shape != (b,):
            raise ValueError(f"task ids must have shape ({b},), got {tuple(task.shape)}")

    @nn.compact
    def __call__(
        self,
        z_BxhxwxC: jax.Array,
        t_B: jax.Array,
        text_BxMxE: jax.Array,
        text_mask_BxM: jax.Array,
        pooled_BxE: jax.Array,
        *,
        plan_BxKxD: jax.Array | None = None,
        task_B: jax.Array | None = None,
        source_BxhxwxC: jax.Array | None = None,
    ) -> jax.Array:
        """Returns the velocity (B, h, w, C) of the target latent, in fp32 (also with `prediction="x"`).

        Args:
          z_BxhxwxC: the noisy target latent z_t.
          t_B: flow time in [0, 1] (1 = noise).
          text_BxMxE, text_mask_BxM, pooled_BxE: the text encoder's tokens, mask and pooled vector.
          plan_BxKxD: the planner's tokens (required unless the planner is ablated).
          task_B: task ids (0 generate, 1 edit, 2 inpaint, 3 sr); default generate.
          source_BxhxwxC: the source latent for edit / inpaint / sr, concatenated along the width.
        """
        cfg = self.cfg
        self._check(z_BxhxwxC, text_BxMxE, text_mask_BxM, pooled_BxE, plan_BxKxD, source_BxhxwxC, task_B)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = z_BxhxwxC.shape
        d, p = cfg.dim, cfg.patch_size
        task_B = jnp.zeros((b,), jnp.int32) if task_B is None else task_B

        # ---- tokens: p x p patches of latent cells, [target | source] on one grid, segment
        # embeddings, 2-D positions. Patches flatten in PyTorch's pixel_unshuffle order.
        patch = layers.dense(d, (None, axes.EMBED), name="patch_embed", **kw)
        segment = layers.param(self, "segment_embed", _init_tokens, (2, d), (None, axes.EMBED), self.param_dtype)
        x = patch(pixel_unshuffle(z_BxhxwxC.astype(self.dtype), p)) + segment[0].astype(self.dtype)
        skip = None
        if cfg.source_skip:  # a submodule: its name, not a counter, seeds it, so no other init moves
            skip = layers.dense(
                d, (None, axes.EMBED), kernel_init=layers.zeros, use_bias=False, name="source_skip", **kw
            )
        if source_BxhxwxC is not None:
            src_cells = pixel_unshuffle(source_BxhxwxC.astype(self.dtype), p)
            if skip is not None:
                x = x + skip(src_cells)
            src = patch(src_cells) + segment[1].astype(self.dtype)
            x = jnp.concatenate([x, src], axis=2)
        elif skip is not None:
            skip(jnp.zeros((0, c * p * p), self.dtype))  # create it: generate and edit share one tree
        grid_hw = (h // p, x.shape[2])
        x = x.reshape(b, grid_hw[0] * grid_hw[1], d)
        if cfg.pos_embed == "sincos":
            if source_BxhxwxC is not None and cfg.source_positions == "aligned":
                # The source half repeats the target's positions: cell (i, j) of both at one place.
                pos = layers.sincos_2d(h // p, w // p, d).reshape(h // p, w // p, d)
                pos = jnp.concatenate([pos, pos], axis=1).reshape(-1, d)  # rows of [target | source]
            else:
                pos = layers.sincos_2d(*grid_hw, d)
            x = x + pos.astype(self.dtype)[None]
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

        # ---- conditioning vector: t_emb + pooled text + task (fp32: timestep frequencies)
        t_emb = layers.timestep_embedding(t_B, 256)
        t_emb = layers.dense(d, (None, axes.EMBED), name="t_fc1", **kw)(t_emb)
        t_emb = layers.dense(d, (axes.MLP, axes.EMBED), name="t_fc2", **kw)(nn.silu(t_emb))
        tasks = layers.param(self, "task_embed", _init_tokens, (NUM_TASKS, d), (None, axes.EMBED), self.param_dtype)
        pooled = layers.dense(d, (None, axes.EMBED), name="pooled_proj", **kw)(pooled_BxE.astype(self.dtype))
        cond_BxD = t_emb + pooled + tasks[task_B].astype(self.dtype)

        # ---- cross-attention context: [text tokens ; plan tokens]
        context = layers.dense(d, (None, axes.EMBED), name="text_proj", **kw)(text_BxMxE.astype(self.dtype))
        mask = text_mask_BxM.astype(bool)
        if cfg.use_planner:
            context = jnp.concatenate([context, plan_BxKxD.astype(self.dtype)], axis=1)
            mask = jnp.concatenate([mask, jnp.ones(plan_BxKxD.shape[:2], bool)], axis=1)

        # ---- blocks
        group = 1 if cfg.adaln == "full" else cfg.adaln_group_size
        shared = SharedMQA(cfg, name="shared_mqa", **kw) if cfg.use_shared_attn else None
        silu_cond = nn.silu(cond_BxD)
        mod = None
        # Rematerialisation trades compute for memory: a block's activations are recomputed in the
        # backward pass. nn.remat keeps the parameter names (block{i}/...); grid_hw (argument 5,
        # counting self) is a Python tuple, hence static.
        block_cls = nn.remat(HybridBlock, static_argnums=(5,)) if cfg.remat else HybridBlock
        for i in range(cfg.depth):
            if i % group == 0:  # AdaLN-Group: one zero-initialised modulation MLP per group
                mod = layers.dense(
                    NUM_MOD * d, (axes.EMBED, axes.MLP), kernel_init=layers.zeros, name=f"adaln{i // group}", **kw
                )
                mod = mod(silu_cond).reshape(b, NUM_MOD, d)
            x = block_cls(cfg, layer_index=i, name=f"block{i}", **kw)(x, mod, context, mask, grid_hw)
            # The tokens after each block, kept only when "intermediates" is mutable (the trainer's
            # attribute-alignment loss reads them); a no-op otherwise.
            self.sow("intermediates", f"tokens{i}", x)
            if shared is not None and (i + 1) % cfg.shared_attn_every == 0:
                x = shared(x)

        # ---- output: modulated final norm, zero-initialised projection, target half only
        final = layers.dense(2 * d, (axes.EMBED, axes.MLP), kernel_init=layers.zeros, name="final_adaln", **kw)
        shift, scale = jnp.split(final(silu_cond), 2, axis=-1)
        x = modulate(_ln("final_norm", **kw)(x), shift, scale)
        v = layers.dense(c * p * p, (axes.EMBED, None), kernel_init=layers.zeros, name="proj_out", **kw)(x)
        v = v.reshape(b, grid_hw[0], grid_hw[1], c * p * p)[:, :, : w // p]
        out = pixel_shuffle(v, p).astype(jnp.float32)
        if cfg.prediction == "x":  # the clean latent x0 -> the velocity (z_t - x0) / t (fp32)
            if cfg.source_residual and source_BxhxwxC is not None:
                out = out + source_BxhxwxC.astype(jnp.float32)  # x0 = source + the predicted change
            t = jnp.maximum(jnp.asarray(t_B, jnp.float32), X_PRED_MIN_T)[:, None, None, None]
            return (z_BxhxwxC.astype(jnp.float32) - out) / t
        return out
