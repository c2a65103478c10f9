"""The pure train steps: `(state, batch, rng, frozen) -> (state, metrics)`, one per stage kind.

The train state of every stage is a dict `{"step", "params", "ema_params", "opt_state"}` (the
VAE stage adds `"disc_params"`, `"disc_opt_state"`); for the flow and edit stages `params` is a
dict of named models (`{"denoiser": ...}`, plus `"text"` when a SimpleTextEncoder trains
jointly). Frozen models (the VAE in the flow stage, the empty prompt's embedding, the LPIPS
network in the VAE stage) come in as a separate argument the step never updates. Per-step randomness is `fold_in(rng, step)`. Metrics
are a flat dict of scalars with `train/...` keys. `train_lib` jits these once with explicit
shardings and buffer donation.

Gradient accumulation (`hp.grad_accum = n`): the step's batch is cut into n micro-batches inside
the jitted step and a `lax.scan` sums their gradients, so memory holds one micro-batch of
activations while the update is the one of the whole batch (per-example randomness is drawn for
the whole batch first, so accumulation changes nothing but the summation order).

Mixed precision: the modules compute in `model.dtype` (bf16 on accelerators) but the parameters,
gradients, optimizer state and EMA stay in fp32 (the master weights), and every loss is fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from microforge_jax import flow, losses, optim
from microforge_jax.models import vae as vae_lib
from microforge_jax.models.denoiser import Denoiser, Text
from microforge_jax.models.planner import plan_diversity_loss
from microforge_jax.models.vae import DCVAE, DiagonalGaussian

State = dict[str, Any]


# ----------------------------------------------------------------------------- gradient accumulation


def split_micro(tree: Any, n: int) -> Any:
    """(B, ...) leaves -> (n, B/n, ...), micro-batch k holding rows k, k+n, k+2n, ...

    Strided rather than contiguous: the batch is sharded in contiguous blocks over the devices, so
    taking every n-th row keeps each micro-batch spread over all of them (no data moves).
    """

    def one(x: jax.Array) -> jax.Array:
        if x.shape[0] % n:
            raise ValueError(f"grad_accum {n} does not divide the per-step batch {x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, tree)


def accumulate_gradients(grad_fn: Any, params: Any, micro: Any, n: int) -> tuple[Any, Any]:
    """Averages `grad_fn(params, micro_batch) -> (aux, grads)` over `n` micro-batches.

    Args:
      grad_fn: returns a pytree of scalars (`aux`, averaged too) and the gradients.
      params: the parameters (fp32 master weights).
      micro: the micro-batches, leaves (n, B/n, ...) from `split_micro`; with n == 1, the batch itself.
      n: the number of micro-batches (1: one plain call, no scan).

    Returns:
      (aux averaged over the micro-batches, fp32 gradients averaged over them).
    """
    if n == 1:
        aux, grads = grad_fn(params, micro)
        return aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    def body(carry, mb):
        aux, grads = grad_fn(params, mb)
        # fp32 sums: bf16 sums of n gradients would lose the small ones.
        return jax.tree.map(lambda c, g: c + g.astype(jnp.float32), carry, grads), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    grads, auxs = jax.lax.scan(body, zeros, micro)
    mean = lambda x: jnp.mean(x.astype(jnp.float32), axis=0)
    return jax.tree.map(mean, auxs), jax.tree.map(lambda g: g / n, grads)


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
    lpips: Any = None  # an `lpips.LPIPS` module when hp.perceptual == "lpips" (its weights come in `frozen`)


def vae_train_step(
    spec: VAEStep, state: State, batch: dict[str, jax.Array], rng: jax.Array, frozen: dict[str, Any] | None = None
) -> tuple[State, dict]:
    """One VAE + discriminator step (both accumulated over `hp.grad_accum` micro-batches).

    `frozen` holds `"lpips"` (the LPIPS VGG + heads, never updated) when `hp.perceptual` is
    "lpips"; otherwise the perceptual term is `losses.gradient_loss` and `frozen` is unused.
    """
    hp = spec.hp
    perceptual_fn = losses.perceptual_loss_fn(hp.get("perceptual", "gradient"), spec.lpips, (frozen or {}).get("lpips"))
    n = int(hp.get("grad_accum", 1))
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    # The discriminator switches on after a warm-up, read from the (restored) step.
    gan_on = jnp.where(step >= hp.disc_start, 1.0, 0.0) * (hp.gan_weight > 0)
    use_gan = hp.gan_weight > 0  # static: with the GAN term off the discriminator is not run at all

    def grad_fn(params_pair, mb):
        params, disc_params = params_pair
        image = mb["image"]
        # Each micro-batch its own posterior noise (the whole batch's, split, would need the
        # VAE's internals); the same distribution as the one-batch step.
        r = jax.random.fold_in(rng, mb["micro"]) if n > 1 else rng

        def loss_fn(params):
            recon, posterior = spec.vae.apply(params, image, rng=r)
            recon = recon.astype(jnp.float32)  # fp32 losses whatever the compute dtype
            l1 = jnp.mean(jnp.abs(recon - image))
            kl = jnp.mean(posterior.kl().astype(jnp.float32))
            perceptual = perceptual_fn(recon, image)
            g_adv = losses.hinge_g_loss(spec.disc.apply(disc_params, recon)) if use_gan else jnp.zeros(())
            loss = hp.l1_weight * l1 + hp.kl_weight * kl + hp.perceptual_weight * perceptual
            loss = loss + gan_on * hp.gan_weight * g_adv
            return loss, (recon, {"l1": l1, "kl": kl, "perceptual": perceptual, "g_adv": g_adv})

        (loss, (recon, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

        def d_loss_fn(disc_params):
            real = spec.disc.apply(disc_params, image)
            fake = spec.disc.apply(disc_params, jax.lax.stop_gradient(recon))
            return losses.hinge_d_loss(real, fake)

        if use_gan:
            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(disc_params)
        else:
            d_loss, d_grads = jnp.zeros(()), jax.tree.map(jnp.zeros_like, disc_params)
        mse = jnp.mean(jnp.square(recon - image.astype(jnp.float32)))
        return {"loss": loss, "d_loss": d_loss, "mse": mse, **parts}, (grads, d_grads)

    images = batch["image"]
    micro = {"image": images} if n == 1 else {"image": split_micro(images, n), "micro": jnp.arange(n)}
    aux, (grads, d_grads) = accumulate_gradients(grad_fn, (state["params"], state["disc_params"]), micro, n)
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    d_updates, d_opt_state = spec.disc_tx.update(d_grads, state["disc_opt_state"], state["disc_params"])
    d_params = optax.apply_updates(state["disc_params"], d_updates)
    # Before the warm-up ends the discriminator does not move (its optimizer state neither).
    keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(gan_on > 0, a, o), new, old)
    new_state = dict(
        state,
        step=step + 1,
        params=params,
        ema_params=optim.ema_update(state["ema_params"], params, step, hp.ema_decay),
        opt_state=opt_state,
        disc_params=keep(d_params, state["disc_params"]),
        disc_opt_state=keep(d_opt_state, state["disc_opt_state"]),
    )
    mse = aux.pop("mse")
    metrics = {
        "train/psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)),  # psnr() of the whole batch
        "train/grad_norm": optax.tree.norm(grads),
        **{f"train/{k}": v for k, v in aux.items()},
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
    attribute_head: Any = None  # losses.AttributeHead when hp.attribute_weight > 0 (params["attribute_head"])


def _normalised_latent(spec: FlowStep, posterior: DiagonalGaussian, rng: jax.Array | None) -> jax.Array:
    """(z - shift) * scale of the posterior's mode, or of a sample with `rng`."""
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return (z - spec.latent_shift) * spec.latent_scale


def encode_latents(spec: FlowStep, vae_params: Any, image: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Images in [-1, 1] -> normalised latents (z - shift) * scale; a posterior sample with `rng`.

    The frozen encoder runs in VAE slices (`vae.auto_slice_size`: whole batches off CPU or sharded).
    """
    posterior = vae_lib.map_slices(lambda x: spec.vae.apply(vae_params, x, method=spec.vae.encode), image)
    return _normalised_latent(spec, posterior, rng)


def batch_latents(spec: FlowStep, vae_params: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> jax.Array:
    """`encode_latents` of `batch["image"]`, or the same from cached posterior moments.

    With `latent_mean` / `latent_logvar` in the batch (`train.flow.cache_latents`, see
    `latent_cache`), the posterior is rebuilt from them and sampled with the same `rng`: the
    same z as encoding the image, without running the encoder.
    """
    if "latent_mean" not in batch:
        return encode_latents(spec, vae_params, batch["image"], rng)
    posterior = DiagonalGaussian(batch["latent_mean"].astype(jnp.float32), batch["latent_logvar"].astype(jnp.float32))
    return _normalised_latent(spec, posterior, rng)


def _text(spec: FlowStep, params: Any, batch: dict[str, jax.Array]) -> Text:
    if spec.text_module is not None:  # SimpleTextEncoder, trained jointly
        out = spec.text_module.apply(params["text"], batch["text_ids"], batch["text_mask"])
        return Text(out.tokens_BxMxD, out.mask_BxM, out.pooled_BxD)
    return Text(batch["text_tokens"], batch["text_mask"], batch["text_pooled"])


def cell_weight_map(cells_Bx9: jax.Array, h: int, w: int, weight: float) -> jax.Array:
    """Per-position loss weights (B, h, w): `weight` inside the shapes world's named cells, else 1.

    `cells_Bx9` marks the 3x3-grid cells (row-major) whose objects the caption places; a latent
    position belongs to the cell holding its centre.
    """
    index_hxw = losses.grid_cells(h, w)
    named = jnp.asarray(cells_Bx9, jnp.float32)[:, index_hxw]
    return 1.0 + (weight - 1.0) * named


def flow_train_step(
    spec: FlowStep, state: State, batch: dict[str, jax.Array], rng: jax.Array, frozen: dict[str, Any]
) -> tuple[State, dict]:
    """One rectified-flow step; with `batch["source"]` (and `batch["task"]`) an editing step.

    With `hp.object_cell_weight` != 1 and `batch["cells"]` (shapes world, (B, 9)), the loss weighs
    the latent positions of the grid cells the caption places objects in by that factor (see
    `cell_weight_map`); rows whose caption was dropped keep uniform weights.

    An editing step with `hp.generate_weight` > 0 adds that weight times the text-to-image loss of
    the same targets under their captions (`batch["gen_text_*"]`, or `gen_text_ids`/`gen_text_mask`
    for a trainable encoder), with fresh times and noise.

    `frozen` holds `"vae"` (the VAE's EMA params) and, for caption dropout, `"empty_text"` (the
    empty prompt's `Text`, batch 1) — or, with a trainable text encoder, `"empty_ids"` and
    `"empty_mask"` (its tokens), encoded inside the step by the encoder being trained.
    """
    hp = spec.hp
    n = int(hp.get("grad_accum", 1))
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    r_vae, r_src, r_t, r_eps, r_drop, r_sc = jax.random.split(rng, 6)
    # Everything random is drawn for the whole batch (the frozen VAE encodes it at once, no
    # gradient), then cut into micro-batches: accumulation gives the one-batch update.
    z0 = batch_latents(spec, frozen["vae"], batch, r_vae)
    b = z0.shape[0]

    def noised(r_t, r_eps, r_drop, r_sc):
        t = flow.sample_time(r_t, b, kind=hp.time_sampling, mean=hp.time_mean, std=hp.time_std, shift=hp.time_shift)
        eps = jax.random.normal(r_eps, z0.shape, jnp.float32)
        return {
            "z_t": flow.interpolate(z0, eps, t),
            "target": flow.velocity_target(z0, eps),
            "t": t,
            "drop": jax.random.bernoulli(r_drop, hp.caption_dropout, (b,)),
            "has_prev": jax.random.bernoulli(r_sc, hp.self_cond_prob, (b,)),
        }

    per_example = {
        **noised(r_t, r_eps, r_drop, r_sc),
        **{k: v for k, v in batch.items() if k not in ("image", "source", "mask", "latent_mean", "latent_logvar")},
    }
    if "source" in batch:
        per_example["source"] = encode_latents(spec, frozen["vae"], batch["source"], None)
    # Edit stage with `generate_weight`: the same targets, captioned (`gen_text_*` in the batch),
    # also trained as text-to-image with their own times and noise, so editing does not unlearn it.
    gen_weight = float(hp.get("generate_weight", 0.0)) if "source" in batch else 0.0
    cell_weight = float(hp.get("object_cell_weight", 1.0))
    if gen_weight > 0:
        gen = noised(*jax.random.split(jax.random.fold_in(rng, 1), 4))
        per_example.update({f"gen_{k}": v for k, v in gen.items()})

    def denoise_loss(params, mb):
        """The weighted flow loss of one task's rows, and the plan (None without a planner)."""
        m = mb["t"].shape[0]
        text = _text(spec, params, mb)
        if spec.text_module is None:
            empty = frozen["empty_text"]
        else:
            empty = _text(spec, params, {"text_ids": frozen["empty_ids"], "text_mask": frozen["empty_mask"]})
        # Caption dropout: the empty prompt's embedding, the unconditional input of guidance.
        pick = lambda e, x: jnp.where(mb["drop"].reshape((m,) + (1,) * (x.ndim - 1)), e.astype(x.dtype), x)
        text = Text(*(pick(e, x) for e, x in zip(empty, text, strict=True)))
        den = params["denoiser"]
        z_t, t, source = mb["z_t"], mb["t"], mb.get("source")
        prev = None
        attr_on = spec.attribute_head is not None and "attrs" in mb and "attribute_head" in params
        if spec.denoiser.cfg.backbone.use_planner:
            # Self-conditioning (RIN): a first planner pass with no previous state, stop-gradiented,
            # is the previous plan for the `has_prev` part of the batch.
            prev = jax.lax.stop_gradient(spec.denoiser.apply(den, z_t, t, text, method=spec.denoiser.plan))
        out = spec.denoiser.apply(
            den,
            z_t,
            t,
            text,
            task_B=mb.get("task"),
            source_BxhxwxC=source,
            prev_plan_BxKxD=prev,
            has_prev_B=mb["has_prev"],
            mutable=["intermediates"] if attr_on else False,
        )
        extra = {}
        if attr_on:  # attribute alignment: a probe on one block's tokens predicts each cell's shape and colour
            (v, plan), inter = out
            p = spec.denoiser.cfg.backbone.patch_size
            tokens = inter["intermediates"]["backbone"][f"tokens{int(hp.attribute_block)}"][0]
            logits = spec.attribute_head.apply(params["attribute_head"], tokens)
            extra["attribute_loss"] = losses.attribute_loss(logits, mb["attrs"], (z_t.shape[1] // p, z_t.shape[2] // p))
        else:
            v, plan = out
        weight = None
        if cell_weight != 1.0 and "cells" in mb:
            # Only where the caption was kept: the weight must be a function of the model's condition.
            cells = jnp.where(mb["drop"][:, None], 0.0, mb["cells"])
            weight = cell_weight_map(cells, *z_t.shape[1:3], cell_weight)
        return flow.flow_loss(v, mb["target"], t, weight), plan, extra  # fp32 (the backbone's output is fp32)

    def loss_fn(params, mb):
        loss, plan, extra = denoise_loss(params, {k: v for k, v in mb.items() if not k.startswith("gen_")})
        diversity = plan_diversity_loss(plan) if plan is not None else jnp.zeros(())
        total = loss + spec.diversity_weight * diversity
        parts = {"flow_loss": loss, "plan_diversity": diversity}
        if "attribute_loss" in extra:
            total = total + float(hp.attribute_weight) * extra["attribute_loss"]
            parts["attribute_loss"] = extra["attribute_loss"]
        if gen_weight > 0:
            gen_loss, _, _ = denoise_loss(params, {k[4:]: v for k, v in mb.items() if k.startswith("gen_")})
            total = total + gen_weight * gen_loss
            parts["generate_loss"] = gen_loss
        return total, {"loss": total, **parts}

    def grad_fn(params, mb):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        return parts, grads

    micro = per_example if n == 1 else split_micro(per_example, n)
    parts, grads = accumulate_gradients(grad_fn, state["params"], micro, n)
    loss = parts.pop("loss")
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
        "train/grad_norm": optax.tree.norm(grads),
        **{f"train/{k}": v for k, v in parts.items()},
    }
    return new_state, metrics


def flow_val_losses(
    spec: FlowStep,
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    frozen: dict[str, Any],
    times: tuple[float, ...],
) -> jax.Array:
    """The flow loss of `params` on one batch at each fixed time in `times` (fp32, shape (len(times),)).

    Deterministic: the posterior mode of the VAE, noise from `key`, no caption dropout and no
    self-conditioning (the planner starts from its initial state, as at the sampler's first step).
    """
    z0 = encode_latents(spec, frozen["vae"], batch["image"], None)
    source = encode_latents(spec, frozen["vae"], batch["source"], None) if "source" in batch else None
    eps = jax.random.normal(key, z0.shape, jnp.float32)
    target = flow.velocity_target(z0, eps)
    text = _text(spec, params, batch)
    b = z0.shape[0]

    def at(t: jax.Array) -> jax.Array:
        t_B = jnp.full((b,), t, jnp.float32)
        v, _ = spec.denoiser.apply(
            params["denoiser"],
            flow.interpolate(z0, eps, t_B),
            t_B,
            text,
            task_B=batch.get("task"),
            source_BxhxwxC=source,
        )
        return flow.flow_loss(v, target, t_B)

    return jax.lax.map(at, jnp.asarray(times, jnp.float32))  # one compiled body for all times
