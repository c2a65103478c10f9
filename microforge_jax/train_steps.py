"""The pure train steps: `(state, batch, rng, frozen) -> (state, metrics)`, one per stage kind.

The train state of every stage is a dict `{"step", "params", "ema_params", "opt_state"}` (the
VAE stage adds `"disc_params"`, `"disc_opt_state"`); for the flow and edit stages `params` is a
dict of named models (`{"denoiser": ...}`, plus `"text"` when a SimpleTextEncoder trains
jointly). Frozen models (the VAE in the flow stage, the empty prompt's embedding) come in as a
separate argument the step never updates. Per-step randomness is `fold_in(rng, step)`. Metrics
are a flat dict of scalars with `train/...` keys. `train_lib` jits these once with explicit
shardings and buffer donation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from microforge_jax import flow, losses, optim
from microforge_jax.models.denoiser import Denoiser, Text
from microforge_jax.models.planner import plan_diversity_loss
from microforge_jax.models.vae import DCVAE

State = dict[str, Any]


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


# ----------------------------------------------------------------------------- VAE stage


@dataclasses.dataclass(frozen=True)
class VAEStep:
    """What the VAE step closes over (modules, optimizers, hyper-parameters); bound by partial."""

    vae: DCVAE
    disc: losses.PatchDiscriminator
    tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    hp: Any  # config.train.vae


def vae_train_step(spec: VAEStep, state: State, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[State, dict]:
    hp = spec.hp
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    image = batch["image"]
    # The discriminator switches on after a warm-up, read from the (restored) step.
    gan_on = jnp.where(step >= hp.disc_start, 1.0, 0.0) * (hp.gan_weight > 0)

    def loss_fn(params):
        recon, posterior = spec.vae.apply(params, image, rng=rng)
        l1 = jnp.mean(jnp.abs(recon - image))
        kl = jnp.mean(posterior.kl())
        perceptual = losses.gradient_loss(recon, image)
        g_adv = losses.hinge_g_loss(spec.disc.apply(state["disc_params"], recon))
        loss = hp.l1_weight * l1 + hp.kl_weight * kl + hp.perceptual_weight * perceptual
        loss = loss + gan_on * hp.gan_weight * g_adv
        return loss, (recon, {"l1": l1, "kl": kl, "perceptual": perceptual, "g_adv": g_adv})

    (loss, (recon, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    def d_loss_fn(disc_params):
        real = spec.disc.apply(disc_params, image)
        fake = spec.disc.apply(disc_params, jax.lax.stop_gradient(recon))
        return losses.hinge_d_loss(real, fake)

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc_params"])
    d_updates, d_opt_state = spec.disc_tx.update(d_grads, state["disc_opt_state"], state["disc_params"])
    d_params = optax.apply_updates(state["disc_params"], d_updates)
    # Before the warm-up ends the discriminator does not move (its optimizer state neither).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(gan_on > 0, n, o), new, old)
    new_state = dict(
        state,
        step=step + 1,
        params=params,
        ema_params=optim.ema_update(state["ema_params"], params, step, hp.ema_decay),
        opt_state=opt_state,
        disc_params=keep(d_params, state["disc_params"]),
        disc_opt_state=keep(d_opt_state, state["disc_opt_state"]),
    )
    metrics = {
        "train/loss": loss,
        "train/psnr": psnr(recon, image),
        "train/d_loss": d_loss,
        "train/grad_norm": optax.global_norm(grads),
        **{f"train/{k}": v for k, v in parts.items()},
    }
    return new_state, metrics


# ----------------------------------------------------------------------------- flow / edit stages


@dataclasses.dataclass(frozen=True)
class FlowStep:
    """What the flow / edit step closes over; bound by partial."""

    denoiser: Denoiser
    vae: DCVAE
    tx: optax.GradientTransformation
    hp: Any  # config.train.flow or config.train.edit
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    diversity_weight: float = 0.0
    text_module: Any = None  # a trainable text encoder (SimpleTextEncoder), else None


def encode_latents(spec: FlowStep, vae_params: Any, image: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Images in [-1, 1] -> normalised latents (z - shift) * scale; a posterior sample with `rng`."""
    posterior = spec.vae.apply(vae_params, image, method=spec.vae.encode)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return (z - spec.latent_shift) * spec.latent_scale


def _text(spec: FlowStep, params: Any, batch: dict[str, jax.Array]) -> Text:
    if spec.text_module is not None:  # SimpleTextEncoder, trained jointly
        out = spec.text_module.apply(params["text"], batch["text_ids"], batch["text_mask"])
        return Text(out.tokens_BxMxD, out.mask_BxM, out.pooled_BxD)
    return Text(batch["text_tokens"], batch["text_mask"], batch["text_pooled"])


def flow_train_step(
    spec: FlowStep, state: State, batch: dict[str, jax.Array], rng: jax.Array, frozen: dict[str, Any]
) -> tuple[State, dict]:
    """One rectified-flow step; with `batch["source"]` (and `batch["task"]`) an editing step.

    `frozen` holds `"vae"` (the VAE's EMA params) and, for caption dropout, `"empty_text"` (the
    empty prompt's `Text`, batch 1) — or, with a trainable text encoder, `"empty_ids"` and
    `"empty_mask"` (its tokens), encoded inside the step by the encoder being trained.
    """
    hp = spec.hp
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    r_vae, r_src, r_t, r_eps, r_drop, r_sc = jax.random.split(rng, 6)
    z0 = encode_latents(spec, frozen["vae"], batch["image"], r_vae)
    source = encode_latents(spec, frozen["vae"], batch["source"], None) if "source" in batch else None
    task = batch.get("task")
    b = z0.shape[0]
    t = flow.sample_time(r_t, b, kind=hp.time_sampling, mean=hp.time_mean, std=hp.time_std, shift=hp.time_shift)
    eps = jax.random.normal(r_eps, z0.shape, jnp.float32)
    z_t = flow.interpolate(z0, eps, t)
    target = flow.velocity_target(z0, eps)
    drop = jax.random.bernoulli(r_drop, hp.caption_dropout, (b,))
    has_prev = jax.random.bernoulli(r_sc, hp.self_cond_prob, (b,))

    def loss_fn(params):
        text = _text(spec, params, batch)
        if spec.text_module is None:
            empty = frozen["empty_text"]
        else:
            empty = _text(spec, params, {"text_ids": frozen["empty_ids"], "text_mask": frozen["empty_mask"]})
        # Caption dropout: the empty prompt's embedding, the unconditional input of guidance.
        pick = lambda e, x: jnp.where(drop.reshape((b,) + (1,) * (x.ndim - 1)), e.astype(x.dtype), x)
        text = Text(*(pick(e, x) for e, x in zip(empty, text, strict=True)))
        den = params["denoiser"]
        prev = None
        if spec.denoiser.cfg.backbone.use_planner:
            # Self-conditioning (RIN): a first planner pass with no previous state, stop-gradiented,
            # is the previous plan for the `has_prev` part of the batch.
            prev = jax.lax.stop_gradient(spec.denoiser.apply(den, z_t, t, text, method=spec.denoiser.plan))
        v, plan = spec.denoiser.apply(
            den, z_t, t, text, task_B=task, source_BxhxwxC=source, prev_plan_BxKxD=prev, has_prev_B=has_prev
        )
        loss = flow.flow_loss(v, target, t)
        diversity = plan_diversity_loss(plan) if plan is not None else jnp.zeros(())
        return loss + spec.diversity_weight * diversity, {"flow_loss": loss, "plan_diversity": diversity}

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(
        state,
        step=step + 1,
        params=params,
        ema_params=optim.ema_update(state["ema_params"], params, step, hp.ema_decay),
        opt_state=opt_state,
    )
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.global_norm(grads),
        **{f"train/{k}": v for k, v in parts.items()},
    }
    return new_state, metrics
