"""The jitted sampler: an ODE from noise to data with the planner carried through `lax.scan`.

One function does the whole job, as MaxDiffusion does: (VAE-encode the source) -> `lax.scan` over
the steps -> VAE decode. The scan carry is `(z_BxhxwxC, plan_NxKxD)`:

* `z` is the latent being denoised, in the backbone's normalised space
  `z' = (z - shift_factor) * scaling_factor` (the VAE latent normalisation of the run), fp32;
* `plan` is the planner state of every row of the denoiser batch. With guidance the denoiser
  batch is N = 2B rows, `[conditional (B) ; unconditional (B)]`: the same z twice, the prompt's
  text then the empty prompt's, so each half carries its own plan tokens from step to step.
  At step 0 there is no previous plan (`has_prev_B` False: the planner starts from `p_init`);
  from step 1 on it starts from the gated mix of the previous step's output and `p_init`.

The step rule is pluggable, `step_fn(z, v, t, t_next) -> z_next` (`flow.euler_step` by default).
A stochastic rule (`stochastic=True`) takes a fifth argument, a PRNG key drawn fresh for each step
from the sampler's `key` (scan inputs, not the carry): `consistency_step`, the few-step sampler of
a consistency-distilled model, denoises to an x0 estimate and re-noises it with fresh noise.

Two second-order rules have their own scans (`step_fn=flow.heun_step` or `flow.dpm_solver_2m_step`,
by name "heun" and "dpm++2m"); guidance mixes the stacked batch at every denoiser evaluation:

* Heun: S steps cost 2S - 1 evaluations (the last step, to t = 0, is a plain Euler step). The scan
  runs over evaluations, not steps, so the denoiser is traced once: a predictor evaluation at
  (z, t_k) stores v and keeps z; the corrector evaluates at the Euler predictor, at t_{k+1}, and
  takes the trapezoidal step. The carry is `(z, v of the previous evaluation, plan)`.
* DPM-Solver++(2M): one evaluation per step; the carry adds the previous step's x0 estimate, and the
  per-step coefficients come from the static time grid (`flow.dpm_solver_2m_coefficients`).

The planner state is threaded through every evaluation in order (the choice for a two-evaluation
step): the corrector of a Heun step starts from the plan its predictor produced, and the next step
from the corrector's, the latest plan, made at the time the next step starts from on the predicted
latent (nearer to training's self-conditioning, which feeds back a plan of the same z_t and t, than
Euler's one step old plan). With `keep_plans` the trajectory has one entry per evaluation.

Edit / inpaint / SR share one compiled function (the task id is traced; only "with a source or
not" changes the graph).

Host-side helpers prepare sources exactly as the shapes dataset does: inpaint holes set to 0 in
[0, 255] space, SR sources nearest-upsampled to the target size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax import flow
from microforge_jax.config import ModelConfig, VAEConfig
from microforge_jax.models.denoiser import TASKS, Text, build_denoiser, task_id
from microforge_jax.models.vae import build_vae, decode_tiled, map_slices

StepFn = Callable[..., jax.Array]  # (z, v, t, t_next) -> z_next, plus a PRNG key when stochastic
SOURCE_TASKS = ("edit", "inpaint", "sr")
SAMPLERS = ("euler", "consistency", "heun", "dpm++2m")

__all__ = [
    "SOURCE_TASKS",
    "TASKS",
    "SAMPLERS",
    "Samples",
    "StepFn",
    "consistency_step",
    "denormalize_latent",
    "from_uint8",
    "get_sampler",
    "initial_noise",
    "inpaint_source",
    "make_sampler",
    "normalize_latent",
    "sr_source",
    "stack_guidance",
    "step_rule",
    "task_id",
    "to_uint8",
    "x0_from_velocity",
]


class Samples(NamedTuple):
    """What a sampler returns.

    Attributes:
      images_BxHxWx3: decoded images in [-1, 1] (None when built with `decode=False`).
      latent_BxhxwxC: the final latent in the backbone's normalised space.
      plans_SxNxKxD: the plan tokens each denoiser evaluation produced (S of them; 2S - 1 for Heun;
        N = 2B with guidance, the conditional half first), when built with `keep_plans=True` and the
        planner is on; else None.
    """

    images_BxHxWx3: jax.Array | None
    latent_BxhxwxC: jax.Array
    plans_SxNxKxD: jax.Array | None


# ----------------------------------------------------------------------------- numerics


def normalize_latent(z_BxhxwxC: jax.Array, vae_cfg: VAEConfig) -> jax.Array:
    """VAE latent -> the backbone's space: (z - shift_factor) * scaling_factor."""
    return (z_BxhxwxC.astype(jnp.float32) - vae_cfg.shift_factor) * vae_cfg.scaling_factor


def denormalize_latent(z_BxhxwxC: jax.Array, vae_cfg: VAEConfig) -> jax.Array:
    """The backbone's space -> VAE latent: z / scaling_factor + shift_factor."""
    return z_BxhxwxC.astype(jnp.float32) / vae_cfg.scaling_factor + vae_cfg.shift_factor


def initial_noise(seed: int, batch: int, latent_hw: tuple[int, int], channels: int) -> jax.Array:
    """The starting noise (B, h, w, C), a pure function of the seed (fp32, N(0, 1))."""
    return jax.random.normal(jax.random.key(seed), (batch, *latent_hw, channels), jnp.float32)


def x0_from_velocity(z: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """The data estimate of a velocity prediction, x0 = z_t - t v (z_t = (1 - t) x0 + t eps, v = eps - x0).

    At t = 0 it is z itself: the boundary condition f(z, 0) = z of a consistency function holds by
    construction. `t` is a scalar or per-example (B,).
    """
    t = jnp.asarray(t, jnp.float32)
    t = t.reshape((-1,) + (1,) * (z.ndim - 1)) if t.ndim else t
    return z.astype(jnp.float32) - t * v.astype(jnp.float32)


def consistency_step(z: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array, key: jax.Array) -> jax.Array:
    """The consistency sampler's step: x0 = z - t v, then z_next = (1 - t_next) x0 + t_next eps, eps fresh.

    Fresh noise per step (multistep consistency sampling, Song et al. 2023): each step lands on a
    new trajectory with the right marginal at t_next, so errors of the x0 estimate are not carried
    along one fixed eps. At t_next = 0 it returns x0 (the last step adds no noise).
    """
    x0 = x0_from_velocity(z, v, t)
    eps = jax.random.normal(key, z.shape, jnp.float32)
    t_next = jnp.asarray(t_next, jnp.float32)
    return (1.0 - t_next) * x0 + t_next * eps


def stack_guidance(cond: Text, uncond: Text) -> Text:
    """[conditional ; unconditional] along the batch; an unconditional batch of 1 is broadcast."""
    b = cond.tokens.shape[0]

    def stack(c: jax.Array, u: jax.Array) -> jax.Array:
        if u.shape[1:] != c.shape[1:]:
            raise ValueError(f"unconditional text shape {tuple(u.shape)} does not match the prompt's {tuple(c.shape)}")
        return jnp.concatenate([c, jnp.broadcast_to(u, (b, *u.shape[1:])).astype(c.dtype)], axis=0)

    return Text(*(stack(c, u) for c, u in zip(cond, uncond)))


def _variables(tree: Any) -> dict[str, Any]:
    """`{"params": tree}` unless the tree already is a variables dict (load_run gives bare trees)."""
    tree = nn.unbox(tree)
    return tree if isinstance(tree, dict) and set(tree) == {"params"} else {"params": tree}


# ----------------------------------------------------------------------------- the sampler

# XLA options for a sampler compiled to a lower peak (`make_sampler(low_memory=True)`, config key
# `sample_low_memory`). With bf16 weights on a CPU, XLA converts each weight to fp32 for its dot or
# conv, and loop-invariant code motion hoists every convert of the denoiser's weights out of the
# step loop, so a full fp32 copy of them lives through the loop; disabling that pass converts
# each weight where it is used. The memory-optimised scheduler orders the VAE decoder's ops to
# free activations sooner. The numbers are unchanged; `python -m microforge_jax.bench --parts
# memory --memory-low-memory` measures the peaks (tiny, 512 px, tiled decode: 104 -> 68 MB).
LOW_MEMORY_COMPILER_OPTIONS: dict[str, str] = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
}


def make_sampler(
    cfg: ModelConfig,
    steps: int,
    *,
    guidance: bool = True,
    shift: float = 1.0,
    step_fn: StepFn = flow.euler_step,
    stochastic: bool = False,
    with_source: bool = False,
    decode: bool = True,
    keep_plans: bool = False,
    denoiser: nn.Module | None = None,
    vae: nn.Module | None = None,
    batch_sharding: jax.sharding.NamedSharding | None = None,
    vae_tile: int = 0,
    vae_tile_overlap: int = 2,
    vae_slice: int | None = None,
    low_memory: bool = False,
    strength: float = 1.0,
    condition_on_source: bool = True,
) -> Callable[..., Samples]:
    """Builds one jitted sampling function (noise -> images) for a model config.

    Args:
      cfg: the model config.
      steps: number of steps S >= 1 (static: the scan length).
      guidance: stack conditional and unconditional inputs (2B rows) and mix with the scale.
      shift: resolution shift of the time grid (`flow.time_grid`); 1 is the plain linear grid.
      step_fn: `(z, v, t, t_next) -> z_next`; Euler by default (`consistency_step` with stochastic=True);
        or a two-evaluation rule with its own scan, `flow.heun_step` or `flow.dpm_solver_2m_step`
        (see the module docstring).
      stochastic: `step_fn` takes a fifth argument, a PRNG key, fresh for each step (split from the
        sampler's `key` argument, which is then required).
      with_source: the tasks edit / inpaint / sr (a source image, VAE-encoded inside).
      decode: VAE-decode the final latent (False: `images_BxHxWx3` is None).
      keep_plans: also return every step's plan tokens (for tests and analysis).
      denoiser, vae: module overrides (test doubles); by default built from `cfg`.
      batch_sharding: a NamedSharding (spec: batch axes first) to pin the latent carry and the
        images to, e.g. `NamedSharding(mesh, P("data"))`; None lets jit follow the inputs.
      vae_tile: decode in overlapping tiles of this many latent cells, blended linearly
        (`vae.decode_tiled`): lower peak memory, slightly different pixels; 0 decodes the whole latent.
      vae_tile_overlap: minimum overlap of neighbouring tiles in latent cells.
      vae_slice: images per VAE call when encoding the source and decoding untiled (VAE slicing,
        `vae_slicing`; the images equal the whole-batch call's up to float rounding); it must divide
        the batch. None: `vae.auto_slice_size` (one image at a time at 256 px on one CPU device, the
        whole batch on accelerators).
      low_memory: on a CPU backend, compile with `LOW_MEMORY_COMPILER_OPTIONS` (the same numbers, a
        lower peak, the same speed; see there); ignored on other backends.
      strength: with a source, how much of it to re-draw (diffusers' img2img `strength`, SDEdit):
        sampling starts at t = strength from z = strength * noise + (1 - strength) * source latent
        and takes `steps` steps down to 0 (the time grid scaled by `strength`); 1 starts from pure
        noise (the default). In (0, 1]; below 1 only with `with_source`.
      condition_on_source: with a source, the denoiser also sees it (the edit / inpaint / sr layout);
        False: the source only sets the start (img2img on the generate task: the image noised to
        `strength`, then text-to-image steps), which needs strength < 1.

    Returns:
      `sample(params, text, uncond, noise_BxhxwxC, scale, source_BxHxWx3=None, task=0, key=None) -> Samples`
      where `params = {"denoiser": tree, "vae": tree}` (bare parameter trees, as `load_run`
      gives them), `text` / `uncond` are `Text` (uncond may have batch 1, and is ignored without
      guidance), `noise` is N(0, 1) in the normalised latent space, `scale` the guidance scale
      (traced: changing it does not recompile), `source` an image in [-1, 1] at the target size
      (required iff `with_source`), `task` a task id (`task_id("edit")`, ...) and `key` the PRNG
      key of a stochastic step rule (required iff `stochastic`).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0 or (strength < 1.0 and not with_source):
        raise ValueError(f"strength must be in (0, 1], and below 1 only with a source; got {strength}")
    if with_source and not condition_on_source and strength >= 1.0:
        raise ValueError("a source that only sets the start (condition_on_source=False) needs strength < 1")
    heun, dpm = step_fn is flow.heun_step, step_fn is flow.dpm_solver_2m_step
    if stochastic and (heun or dpm):
        raise ValueError("the heun and dpm++2m rules are deterministic: build them with stochastic=False")
    denoiser = denoiser if denoiser is not None else build_denoiser(cfg)
    vae = vae if vae is not None else build_vae(cfg)
    ts = np.asarray(flow.time_grid(steps, shift), np.float32) * np.float32(strength)  # static: a constant

    def constrain(x: jax.Array) -> jax.Array:
        return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

    def sample(
        params: dict[str, Any],
        text: Text,
        uncond: Text | None,
        noise_BxhxwxC: jax.Array,
        scale: jax.Array | float,
        source_BxHxWx3: jax.Array | None = None,
        task: jax.Array | int = 0,
        key: jax.Array | None = None,
    ) -> Samples:
        dvars = _variables(params["denoiser"])
        b = noise_BxhxwxC.shape[0]
        if (source_BxHxWx3 is None) == with_source:
            raise ValueError(f"this sampler was built with with_source={with_source}: pass a source iff it is set")
        if guidance and uncond is None:
            raise ValueError("a guided sampler needs the unconditional text (the empty prompt's embeddings)")
        if (key is None) == stochastic:
            raise ValueError(f"this sampler was built with stochastic={stochastic}: pass a key iff it is set")
        text_N = stack_guidance(text, uncond) if guidance else text
        n = 2 * b if guidance else b
        task_N = jnp.full((n,), task, jnp.int32)
        source_N = None
        if with_source:
            vvars = _variables(params["vae"])
            src = source_BxHxWx3.astype(jnp.float32)
            posterior = map_slices(lambda x: vae.apply(vvars, x, method="encode"), src, vae_slice)
            source = constrain(normalize_latent(posterior.mode(), cfg.vae))
            if source.shape != noise_BxhxwxC.shape:
                raise ValueError(f"source latent {tuple(source.shape)} != target latent {tuple(noise_BxhxwxC.shape)}")
            if condition_on_source:
                source_N = jnp.concatenate([source, source]) if guidance else source  # both halves see it

        def denoise(z, t, prev, has_prev):
            z_N = jnp.concatenate([z, z]) if guidance else z
            t_N = jnp.full((n,), t, jnp.float32)
            return denoiser.apply(
                dvars,
                z_N,
                t_N,
                text_N,
                task_B=task_N,
                source_BxhxwxC=source_N,
                prev_plan_BxKxD=prev,
                has_prev_B=None if prev is None else jnp.full((n,), has_prev),
            )

        # The plan state's shape and dtype (or None when the planner is ablated), for the carry.
        plan_struct = jax.eval_shape(lambda z: denoise(z, 1.0, None, False)[1], noise_BxhxwxC)
        plan0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), plan_struct)

        def velocity(z, t, plan, has_prev):
            """One denoiser evaluation: the (guided) velocity at (z, t) and the new plan."""
            v_N, new_plan = denoise(z, t, plan, has_prev)
            return (flow.guidance(v_N[:b], v_N[b:], scale) if guidance else v_N), new_plan

        def body(carry, x):
            z, plan = carry
            t, t_next, first, *step_key = x  # step_key: [a PRNG key] for a stochastic rule, else []
            v, new_plan = velocity(z, t, plan, jnp.logical_not(first))
            z_next = constrain(step_fn(z, v, t, t_next, *step_key).astype(jnp.float32))
            return (z_next, new_plan), (new_plan if keep_plans else None)

        def heun_body(carry, x):  # one evaluation of a Heun step (`_heun_schedule`)
            z, v_prev, plan = carry
            t, t_next, phase, first = x
            correct = phase == _CORRECT
            z_eval = constrain(jnp.where(correct, flow.euler_step(z, v_prev, t, t_next), z))
            v, new_plan = velocity(z_eval, jnp.where(correct, t_next, t), plan, jnp.logical_not(first))
            stepped = jnp.where(correct, flow.heun_step(z, v_prev, v, t, t_next), flow.euler_step(z, v, t, t_next))
            z_next = constrain(jnp.where(phase == _PREDICT, z, stepped))
            return (z_next, v, new_plan), (new_plan if keep_plans else None)

        def dpm_body(carry, x):
            z, x0_prev, plan = carry
            t, first, ratio, slope = x
            v, new_plan = velocity(z, t, plan, jnp.logical_not(first))
            x0 = x0_from_velocity(z, v, t)
            z_next = constrain(flow.dpm_solver_2m_step(z, x0, x0_prev, ratio, slope))
            return (z_next, x0, new_plan), (new_plan if keep_plans else None)

        z0 = noise_BxhxwxC.astype(jnp.float32)
        if strength < 1.0:  # SDEdit: start from the source latent, noised to t = strength
            z0 = flow.interpolate(source, z0, jnp.full((b,), strength, jnp.float32))
        z0 = constrain(z0)
        if heun:
            t_e, t_next_e, phase_e = _heun_schedule(ts)
            xs = (jnp.asarray(t_e), jnp.asarray(t_next_e), jnp.asarray(phase_e), jnp.arange(len(t_e)) == 0)
            (z, _, _), plans = jax.lax.scan(heun_body, (z0, jnp.zeros_like(z0), plan0), xs)
        elif dpm:
            ratio, slope = flow.dpm_solver_2m_coefficients(ts)
            xs = (jnp.asarray(ts[:-1]), jnp.arange(steps) == 0, *(jnp.asarray(c, jnp.float32) for c in (ratio, slope)))
            (z, _, _), plans = jax.lax.scan(dpm_body, (z0, jnp.zeros_like(z0), plan0), xs)
        else:
            xs = (jnp.asarray(ts[:-1]), jnp.asarray(ts[1:]), jnp.arange(steps) == 0)
            if stochastic:
                xs = (*xs, jax.random.split(key, steps))
            (z, _), plans = jax.lax.scan(body, (z0, plan0), xs)
        images = None
        if decode:
            vvars = _variables(params["vae"])
            z_vae = denormalize_latent(z, cfg.vae)
            if vae_tile > 0:
                images = decode_tiled(vae, vvars, z_vae, vae_tile, vae_tile_overlap)
            else:
                dec = lambda z: vae.apply(vvars, z, method="decode")
                images = map_slices(dec, z_vae, vae_slice, upscale=cfg.vae.downsample_factor**2)
            images = constrain(jnp.clip(images.astype(jnp.float32), -1.0, 1.0))
        return Samples(images, z, plans)

    # CPU only: the fp32 weight copies it avoids are a CPU artefact (GPUs and TPUs compute in bf16),
    # and `xla_cpu_scheduler_type` is a CPU option.
    use = low_memory and jax.default_backend() == "cpu"
    return jax.jit(sample, compiler_options=dict(LOW_MEMORY_COMPILER_OPTIONS) if use else None)


# The phases of a Heun evaluation (`make_sampler`'s `heun_body`): an Euler step (the last step, to
# t = 0), a predictor (z kept, v stored) and a corrector (at the predicted point, then the trapezoid).
_EULER, _PREDICT, _CORRECT = 0, 1, 2


def _heun_schedule(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per denoiser evaluation of Heun on the grid `ts` (S + 1,): the step's (t, t_next) and the phase.

    Steps 0 .. S-2 are a predictor and a corrector each, the last step a plain Euler step: 2S - 1 rows.
    """
    s = len(ts) - 1
    k = np.concatenate([np.repeat(np.arange(s - 1), 2), [s - 1]])
    phase = np.array([_PREDICT, _CORRECT] * (s - 1) + [_EULER], np.int32)
    return ts[k], ts[k + 1], phase


def step_rule(sampler: str) -> tuple[StepFn, bool]:
    """`(step_fn, stochastic)` of a sampler name in SAMPLERS ("euler", "consistency", "heun", "dpm++2m")."""
    rules = {
        "euler": (flow.euler_step, False),
        "consistency": (consistency_step, True),
        "heun": (flow.heun_step, False),
        "dpm++2m": (flow.dpm_solver_2m_step, False),
    }
    if sampler not in rules:
        raise ValueError(f"unknown sampler {sampler!r}; samplers are {', '.join(SAMPLERS)}")
    return rules[sampler]


@functools.lru_cache(maxsize=16)
def get_sampler(
    cfg: ModelConfig,
    steps: int,
    *,
    guidance: bool = True,
    shift: float = 1.0,
    with_source: bool = False,
    sampler: str = "euler",
    vae_tile: int = 0,
    low_memory: bool = False,
) -> Callable[..., Samples]:
    """`make_sampler` with the default modules, cached: one jitted function per configuration.

    Args:
      cfg, steps, guidance, shift, with_source, vae_tile, low_memory: see `make_sampler`.
      sampler: the step rule by name (`step_rule`, SAMPLERS); "consistency" needs the `key` argument.

    Returns:
      The jitted sampler (shared by every caller asking for the same configuration).
    """
    step_fn, stochastic = step_rule(sampler)
    return make_sampler(
        cfg,
        steps,
        guidance=guidance,
        shift=shift,
        with_source=with_source,
        step_fn=step_fn,
        stochastic=stochastic,
        vae_tile=vae_tile,
        low_memory=low_memory,
    )


# ----------------------------------------------------------------------------- host-side images


def from_uint8(images_NxHxWx3: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the VAE's range)."""
    return np.asarray(images_NxHxWx3, np.float32) / 127.5 - 1.0


def to_uint8(images_NxHxWx3: Any) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], rounded."""
    x = (np.asarray(images_NxHxWx3, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def inpaint_source(image_HxWx3: np.ndarray, mask_HxW: np.ndarray) -> np.ndarray:
    """The inpaint source as the dataset builds it: the image with the hole (mask True) set to 0.

    Args:
      image_HxWx3: uint8 image.
      mask_HxW: hole mask (HxW or HxWx1); nonzero / True = hole.

    Returns:
      uint8 HxWx3.
    """
    image = np.asarray(image_HxWx3)
    mask = np.asarray(mask_HxW)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"the mask is {mask.shape[0]}x{mask.shape[1]} but the source image is {image.shape[0]}x{image.shape[1]}; they must match"
        )
    return np.where(mask.astype(bool)[..., None], np.uint8(0), image).astype(np.uint8)


def sr_source(low_hxwx3: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """The SR source as the dataset builds it: the low-res image nearest-upsampled to `size_hw`.

    Args:
      low_hxwx3: uint8 low-resolution image.
      size_hw: the target (H, W), integer multiples of the low-res size.

    Returns:
      uint8 HxWx3.
    """
    low = np.asarray(low_hxwx3)
    (h, w), (th, tw) = low.shape[:2], size_hw
    if th % h or tw % w or th < h or tw < w:
        raise ValueError(f"SR target size {th}x{tw} must be an integer multiple of the low-res size {h}x{w}")
    return np.repeat(np.repeat(low, th // h, axis=0), tw // w, axis=1)
