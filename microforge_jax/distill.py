"""Stages 4 and 6 of the curriculum: distillation from a teacher, and few-step (consistency) distillation.

Stage "distill" (the seed's stage 4) trains the text -> image student with the flow loss plus a
term pulling its velocity toward a frozen teacher's, at the same noisy input:

    L = E[w(t) ||v_s - v*||^2] + lambda * E[w(t) ||v_s - sg(v_T)||^2]        w = flow.loss_weight

Stage "consistency" (the seed's stage 6) is consistency distillation (Song et al. 2023) in the
x0-parametrisation of the flow model, f_theta(z, t) = z - t v_theta(z, t) (so f(z, 0) = z holds by
construction): on the grid t_n = n / N (shifted), n uniform in 1..N,

    z_t  = (1 - t) z_0 + t eps                          t = t_n
    z_t' = z_t - (t - t') v_T(z_t, t)                   one Euler step of the frozen teacher, t' = t_{n-1}
    L    = E ||f_theta(z_t, t) - sg f_ema(z_t', t')||^2

where `ema` (theta-) is the stage's EMA (`ema_params`, also the weights sampling uses). At n = 1
the target is z_t' itself, the boundary condition that anchors the chain to the teacher's ODE.

The teacher of both: `train.<stage>.teacher`, another run's directory (e.g. a larger backbone; it
must share this run's VAE, latent normalisation and text encoder), or by default this run's own
latest EMA of the stages before (flow -> edit -> distill), frozen. The student starts from this
run's latest earlier denoiser (params and EMA) when there is one. Teacher outputs are recomputed at
every step (not cached: they depend on the freshly drawn t and noise).

Both stages train on the text -> image ("generate") data only; guidance at sampling works because
captions are dropped (the teacher sees the same dropped caption). Sampling a consistency model:
`sampling.consistency_step` (denoise to x0, re-noise to t_next with fresh noise).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from microforge_jax import checkpoint, flow, optim, sampling, sharding, train_steps
from microforge_jax.config import ModelConfig
from microforge_jax.models.denoiser import Denoiser, Text, build_denoiser
from microforge_jax.models.planner import plan_diversity_loss
from microforge_jax.models.vae import build_vae

State = dict[str, Any]
DISTILL_STAGES: tuple[str, ...] = ("distill", "consistency")
# Model sections a teacher run must share with the student: the latents and the text they see.
TEACHER_SHARED_KEYS: tuple[str, ...] = ("vae", "latent_channels", "text")


@dataclasses.dataclass(frozen=True)
class DistillStep:
    """What the distill / consistency steps close over; bound by partial.

    `student.hp` is `config.train.distill` or `config.train.consistency`; `teacher` is the teacher's
    module (the student's own for a self-teacher); its parameters come in `frozen["teacher"]`.
    """

    student: train_steps.FlowStep
    teacher: Denoiser
    weight: float = 1.0  # lambda of the distillation term (stage "distill")
    teacher_cfg: float = 1.0  # guidance scale of the teacher's ODE step (stage "consistency"); 1: unguided


# ----------------------------------------------------------------------------- shared pieces


def conditioning(spec: train_steps.FlowStep, params: Any, mb: dict[str, jax.Array], frozen: dict[str, Any]) -> Text:
    """The caption's `Text`, the empty prompt's where `mb["drop"]` (caption dropout, as the flow step).

    With a trainable text encoder the text is encoded with `params["text"]` (the student's, the
    EMA's or the teacher's own).
    """
    m = mb["t"].shape[0]
    text = train_steps._text(spec, params, mb)
    if spec.text_module is None:
        empty = frozen["empty_text"]
    else:
        empty = train_steps._text(spec, params, {"text_ids": frozen["empty_ids"], "text_mask": frozen["empty_mask"]})
    pick = lambda e, x: jnp.where(mb["drop"].reshape((m,) + (1,) * (x.ndim - 1)), e.astype(x.dtype), x)
    return Text(*(pick(e, x) for e, x in zip(empty, text, strict=True)))


def predict(
    denoiser: Denoiser, den_params: Any, z_BxhxwxC: jax.Array, t_B: jax.Array, text: Text, has_prev_B: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """(v fp32, plan) with the flow step's self-conditioning: a first, stop-gradiented planner pass
    is the previous plan of the `has_prev_B` rows (the others start from p_init)."""
    prev = None
    if denoiser.cfg.backbone.use_planner:
        prev = jax.lax.stop_gradient(denoiser.apply(den_params, z_BxhxwxC, t_B, text, method=denoiser.plan))
    v, plan = denoiser.apply(den_params, z_BxhxwxC, t_B, text, prev_plan_BxKxD=prev, has_prev_B=has_prev_B)
    return v.astype(jnp.float32), plan


def _teacher_velocity(
    spec: DistillStep, mb: dict[str, jax.Array], z: jax.Array, text: Text, frozen: dict[str, Any], scale: float = 1.0
) -> jax.Array:
    """The frozen teacher's velocity at (z, mb["t"]) (no gradient); guided with `scale` != 1."""
    teacher = frozen["teacher"]
    trainable = spec.student.text_module is not None  # a trained text encoder: the teacher's own weights
    if trainable:
        text = conditioning(spec.student, teacher, mb, frozen)
    v, _ = predict(spec.teacher, teacher["denoiser"], z, mb["t"], text, mb["has_prev"])
    if scale != 1.0:  # the empty prompt's velocity, mixed as the sampler does
        all_dropped = dict(mb, drop=jnp.ones_like(mb["drop"]))
        uncond = conditioning(spec.student, teacher if trainable else {}, all_dropped, frozen)
        v_uncond, _ = predict(spec.teacher, teacher["denoiser"], z, mb["t"], uncond, mb["has_prev"])
        v = flow.guidance(v, v_uncond, scale)
    return jax.lax.stop_gradient(v)


def _per_example_inputs(
    spec: train_steps.FlowStep,
    batch: dict[str, jax.Array],
    frozen: dict[str, Any],
    r_vae: jax.Array,
    r_eps: jax.Array,
    r_drop: jax.Array,
    r_sc: jax.Array,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """z_0 (the frozen VAE's posterior sample), eps, caption dropout and self-conditioning masks + text fields."""
    hp = spec.hp
    z0 = train_steps.encode_latents(spec, frozen["vae"], batch["image"], r_vae)
    b = z0.shape[0]
    eps = jax.random.normal(r_eps, z0.shape, jnp.float32)
    per_example = {
        "drop": jax.random.bernoulli(r_drop, hp.caption_dropout, (b,)),
        "has_prev": jax.random.bernoulli(r_sc, hp.self_cond_prob, (b,)),
        **{k: v for k, v in batch.items() if k != "image"},
    }
    return z0, eps, per_example


def _apply_update(spec: train_steps.FlowStep, state: State, grads: Any) -> State:
    """The optimizer update, the EMA (from the pre-update step, as the flow step) and step + 1."""
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(
        state,
        step=state["step"] + 1,
        params=params,
        ema_params=optim.ema_update(state["ema_params"], params, state["step"], spec.hp.ema_decay),
        opt_state=opt_state,
    )


def _accumulated(spec: train_steps.FlowStep, loss_fn: Any, state: State, per_example: dict) -> tuple[dict, Any]:
    """(parts, grads) of `loss_fn(params, mb) -> (total, parts)`, over `hp.grad_accum` micro-batches."""
    n = int(spec.hp.get("grad_accum", 1))

    def grad_fn(params, mb):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        return parts, grads

    micro = per_example if n == 1 else train_steps.split_micro(per_example, n)
    return train_steps.accumulate_gradients(grad_fn, state["params"], micro, n)


def _metrics(parts: dict, grads: Any) -> dict[str, jax.Array]:
    return {"train/grad_norm": optax.global_norm(grads), **{f"train/{k}": v for k, v in parts.items()}}


# ----------------------------------------------------------------------------- stage 4: distillation


def distill_loss(
    v_student: jax.Array, v_target: jax.Array, v_teacher: jax.Array, t_B: jax.Array, weight: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(L_flow + weight * L_distill, L_flow, L_distill), L_distill = mean_B w(t) mean ||v_s - sg(v_T)||^2 (fp32)."""
    flow_term = flow.flow_loss(v_student, v_target, t_B)
    distill_term = flow.flow_loss(v_student, jax.lax.stop_gradient(v_teacher), t_B)
    return flow_term + weight * distill_term, flow_term, distill_term


def distill_loss_fn(
    spec: DistillStep, params: Any, mb: dict[str, jax.Array], frozen: dict[str, Any]
) -> tuple[jax.Array, dict]:
    """The distill stage's loss on one (micro-)batch: `mb` holds z_t, target, t, drop, has_prev and the text.

    Returns (total, parts) with parts `loss`, `flow_loss`, `distill_loss`, `plan_diversity`.
    """
    s = spec.student
    text = conditioning(s, params, mb, frozen)
    v, plan = predict(s.denoiser, params["denoiser"], mb["z_t"], mb["t"], text, mb["has_prev"])
    v_teacher = _teacher_velocity(spec, mb, mb["z_t"], text, frozen)
    total, flow_term, distill_term = distill_loss(v, mb["target"], v_teacher, mb["t"], spec.weight)
    diversity = plan_diversity_loss(plan) if plan is not None else jnp.zeros(())
    total = total + s.diversity_weight * diversity
    return total, {"loss": total, "flow_loss": flow_term, "distill_loss": distill_term, "plan_diversity": diversity}


def distill_train_step(
    spec: DistillStep, state: State, batch: dict[str, jax.Array], rng: jax.Array, frozen: dict[str, Any]
) -> tuple[State, dict]:
    """One distillation step; `frozen` holds "vae", the empty prompt (as the flow step) and "teacher"."""
    hp = spec.student.hp
    rng = jax.random.fold_in(rng, state["step"])
    r_vae, r_t, r_eps, r_drop, r_sc = jax.random.split(rng, 5)
    z0, eps, per_example = _per_example_inputs(spec.student, batch, frozen, r_vae, r_eps, r_drop, r_sc)
    t = flow.sample_time(
        r_t, z0.shape[0], kind=hp.time_sampling, mean=hp.time_mean, std=hp.time_std, shift=hp.time_shift
    )
    per_example.update(z_t=flow.interpolate(z0, eps, t), target=flow.velocity_target(z0, eps), t=t)
    loss_fn = lambda params, mb: distill_loss_fn(spec, params, mb, frozen)
    parts, grads = _accumulated(spec.student, loss_fn, state, per_example)
    return _apply_update(spec.student, state, grads), _metrics(parts, grads)


# ----------------------------------------------------------------------------- stage 6: consistency


def consistency_times(rng: jax.Array, batch: int, num_scales: int, shift: float) -> tuple[jax.Array, jax.Array]:
    """(t, t') on the grid n / N (shifted): n uniform in 1..N, t' the grid point below t (t' = 0 at n = 1)."""
    n = jax.random.randint(rng, (batch,), 1, num_scales + 1).astype(jnp.float32)
    return flow.shift_time(n / num_scales, shift), flow.shift_time((n - 1.0) / num_scales, shift)


def consistency_target(
    spec: DistillStep, ema_params: Any, mb: dict[str, jax.Array], frozen: dict[str, Any]
) -> jax.Array:
    """sg f_ema(z_t', t'): the teacher's Euler step from (z_t, t) to t' (guided by `spec.teacher_cfg`),
    then the EMA's x0 estimate there."""
    s = spec.student
    text = conditioning(s, ema_params, mb, frozen)
    v_teacher = _teacher_velocity(spec, mb, mb["z_t"], text, frozen, spec.teacher_cfg)
    z_prev = flow.euler_step(mb["z_t"], v_teacher, mb["t"], mb["t_prev"])
    v_ema, _ = predict(s.denoiser, ema_params["denoiser"], z_prev, mb["t_prev"], text, mb["has_prev"])
    return jax.lax.stop_gradient(sampling.x0_from_velocity(z_prev, v_ema, mb["t_prev"]))


def consistency_loss_fn(
    spec: DistillStep, params: Any, ema_params: Any, mb: dict[str, jax.Array], frozen: dict[str, Any]
) -> tuple[jax.Array, dict]:
    """||f_theta(z_t, t) - sg f_ema(z_t', t')||^2 (mean over elements, then the batch), plus plan diversity.

    `mb` holds z_t, t, t_prev (t'), drop, has_prev and the text fields.
    """
    s = spec.student
    text = conditioning(s, params, mb, frozen)
    v, plan = predict(s.denoiser, params["denoiser"], mb["z_t"], mb["t"], text, mb["has_prev"])
    f = sampling.x0_from_velocity(mb["z_t"], v, mb["t"])
    target = consistency_target(spec, ema_params, mb, frozen)
    loss = jnp.mean(jnp.square(f - target))
    diversity = plan_diversity_loss(plan) if plan is not None else jnp.zeros(())
    total = loss + s.diversity_weight * diversity
    return total, {"loss": total, "consistency_loss": loss, "plan_diversity": diversity}


def consistency_train_step(
    spec: DistillStep, state: State, batch: dict[str, jax.Array], rng: jax.Array, frozen: dict[str, Any]
) -> tuple[State, dict]:
    """One consistency-distillation step (the target is the state's EMA, before this step's update)."""
    hp = spec.student.hp
    rng = jax.random.fold_in(rng, state["step"])
    r_vae, r_t, r_eps, r_drop, r_sc = jax.random.split(rng, 5)
    z0, eps, per_example = _per_example_inputs(spec.student, batch, frozen, r_vae, r_eps, r_drop, r_sc)
    t, t_prev = consistency_times(r_t, z0.shape[0], int(hp.num_scales), float(hp.time_shift))
    per_example.update(z_t=flow.interpolate(z0, eps, t), t=t, t_prev=t_prev)
    ema = state["ema_params"]
    loss_fn = lambda params, mb: consistency_loss_fn(spec, params, ema, mb, frozen)
    parts, grads = _accumulated(spec.student, loss_fn, state, per_example)
    return _apply_update(spec.student, state, grads), _metrics(parts, grads)


# ----------------------------------------------------------------------------- the stage runner


def _earlier_denoiser_stage(workdir: Path, stage: str) -> str | None:
    """The latest stage before `stage` in DENOISER_STAGES with a checkpoint in `workdir` (load_run's order)."""
    steps = checkpoint.latest_steps(workdir)
    earlier = checkpoint.DENOISER_STAGES[: checkpoint.DENOISER_STAGES.index(stage)]
    return next((s for s in reversed(earlier) if s in steps), None)


def load_teacher(stage: str, config, workdir: Path, vae_params: Any) -> tuple[Denoiser | None, dict[str, Any], str]:
    """(module or None for "the student's own", named EMA params, description) of the stage's teacher.

    Raises:
      RunError: no teacher (no earlier denoiser and no `teacher` run), or a teacher run whose VAE,
        latent normalisation or text encoder differs from this run's (its velocities would live in
        another latent space).
    """
    source = str(config.train[stage].teacher)
    if not source:
        found = _earlier_denoiser_stage(workdir, stage)
        if found is None:
            raise checkpoint.RunError(
                f"stage {stage!r} needs a teacher: train a flow stage first, or set train.{stage}.teacher=<run dir>"
            )
        ema = checkpoint.restore_stage_params(workdir, found, ("ema_params",))["ema_params"]
        return None, ema, f"this run's {found} EMA"
    t_config, t_params = checkpoint.load_run(source)
    for key in TEACHER_SHARED_KEYS:
        mine, theirs = config.model[key], t_config.model.get(key)
        mine = mine.to_dict() if hasattr(mine, "to_dict") else mine
        theirs = theirs.to_dict() if hasattr(theirs, "to_dict") else theirs
        if mine != theirs:
            raise checkpoint.RunError(
                f"teacher run {source}: model.{key} differs from this run's ({theirs!r} vs {mine!r}); a teacher "
                f"must share the VAE, its latent normalisation and the text encoder"
            )
    if "denoiser" not in t_params or "vae" not in t_params:
        raise checkpoint.RunError(f"teacher run {source} has no trained VAE and denoiser")
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(t_params["vae"]), jax.tree.leaves(vae_params), strict=True)
    )
    if diff > 1e-6:
        raise checkpoint.RunError(
            f"teacher run {source} has another VAE (weights differ by {diff:.3g}); copy its checkpoints/vae "
            f"and config.json's model.vae into this run before its flow stage"
        )
    module = build_denoiser(ModelConfig.from_config(t_config))
    return module, {k: v for k, v in t_params.items() if k in ("denoiser", "text")}, f"run {source}"


def run_distill_stage(stage: str, config, workdir: Path, mesh, rules, vae_params: Any) -> Any:
    """The "distill" or "consistency" stage through `train_lib._train_loop`; returns the EMA params (host)."""
    from microforge_jax import train_lib  # noqa: PLC0415 (train_lib dispatches here)
    from microforge_jax.data import pipeline  # noqa: PLC0415
    from microforge_jax.text import TextEmbeddingCache, load_text_encoder  # noqa: PLC0415 (loads transformers)

    if stage not in DISTILL_STAGES:
        raise ValueError(f"unknown distillation stage {stage!r}; expected one of {', '.join(DISTILL_STAGES)}")
    hp = config.train[stage]
    cfg = ModelConfig.from_config(config)
    denoiser, vae = build_denoiser(cfg), build_vae(cfg)
    encoder = load_text_encoder(cfg.text, dtype=jnp.float32)
    trainable_text = encoder.trainable
    tx = optim.make_optimizer(hp)
    local = pipeline.per_process_batch_size(hp.batch_size, jax.process_count())
    side = config.image_size // cfg.vae.downsample_factor
    z = jnp.zeros((local, side, side, cfg.latent_channels), jnp.float32)
    m, e = encoder.max_length, encoder.embed_dim
    text = Text(jnp.zeros((local, m, e)), jnp.ones((local, m), bool), jnp.zeros((local, e)))

    saved = checkpoint.latest_steps(workdir).get(stage)
    teacher_module, teacher_params = None, {}
    if saved is None or saved < hp.steps:  # a finished stage needs no teacher (the loop says "already trained")
        teacher_module, teacher_params, teacher_name = load_teacher(stage, config, workdir, vae_params)
    start_from = None
    if saved is None:  # the student's starting point: this run's latest earlier denoiser, else init_from
        earlier = _earlier_denoiser_stage(workdir, stage)
        student_name = "a fresh init"
        if earlier is not None:
            start_from, student_name = checkpoint.restore_stage_params(workdir, earlier), f"this run's {earlier}"
        elif config.get("init_from"):
            start_from, student_name = train_lib._init_from_params(Path(config.init_from), stage), config.init_from
        if jax.process_index() == 0:
            print(f"[{stage}] teacher: {teacher_name}; student from {student_name}")

    def init_fn():
        r_den, r_text = jax.random.split(jax.random.key(config.seed + 1))
        params = {"denoiser": denoiser.init(r_den, z, jnp.zeros((local,), jnp.float32), text)}
        if trainable_text:
            params["text"] = encoder.init(r_text)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}

    student = train_steps.FlowStep(
        denoiser,
        vae,
        tx,
        hp,
        latent_scale=float(cfg.vae.scaling_factor),
        latent_shift=float(cfg.vae.shift_factor),
        diversity_weight=float(cfg.planner.diversity_weight),
        text_module=encoder if trainable_text else None,
    )
    spec = DistillStep(
        student, teacher_module or denoiser, float(hp.get("weight", 1.0)), float(hp.get("teacher_cfg", 1.0))
    )
    train_step = distill_train_step if stage == "distill" else consistency_train_step
    step_fn = lambda state, batch, rng, frozen: train_step(spec, state, batch, rng, frozen)
    if trainable_text:
        ids, mask = encoder.tokenize([""])
        frozen = {"vae": vae_params, "empty_ids": ids, "empty_mask": mask}
    else:
        empty = encoder.encode([""])
        frozen = {"vae": vae_params, "empty_text": Text(empty.tokens_BxMxD, empty.mask_BxM, empty.pooled_BxD)}
    frozen["teacher"] = teacher_params
    cache = TextEmbeddingCache(encoder) if not trainable_text and hp.text_cache else None

    def host_to_batch(b):
        prompts = [str(s) for s in b["text"]]
        out = {"image": b["image"]}
        if trainable_text:
            out["text_ids"], out["text_mask"] = encoder.tokenize(prompts)
        else:
            emb = cache.lookup(prompts) if cache is not None else jax.device_get(encoder.encode(prompts))
            out.update(text_tokens=emb.tokens_BxMxD, text_mask=emb.mask_BxM, text_pooled=emb.pooled_BxD)
        return sharding.shard_batch(out, mesh, rules)

    evaluate = None
    if stage == "distill":  # the flow validation loss, comparable with the flow stage's
        val_iter = iter(train_lib._stage_data(config, "flow", hp, split="val"))
        val_batches = [host_to_batch(next(val_iter)) for _ in range(max(1, config.eval_batches))]
        times = train_lib.VAL_TIMES
        val_fn = jax.jit(lambda p, b, k, frz: train_steps.flow_val_losses(student, p, b, k, frz, times))
        replicated = NamedSharding(mesh, PartitionSpec())
        val_frozen = {k: v for k, v in frozen.items() if k != "teacher"}
        val_frozen = sharding.put_global(val_frozen, jax.tree.map(lambda _: replicated, val_frozen))

        def evaluate(state) -> dict[str, float]:
            key = jax.random.key(config.seed + 7)
            per_t = np.mean(
                [
                    np.asarray(val_fn(state["ema_params"], b, jax.random.fold_in(key, i), val_frozen))
                    for i, b in enumerate(val_batches)
                ],
                axis=0,
            )
            return {"val/loss": float(per_t.mean()), **{f"val/loss_t{t:g}": float(v) for t, v in zip(times, per_t)}}

        sample = train_lib._sample_hook(stage, config, cfg, encoder, vae_params, workdir, hp)
    else:
        sample = _consistency_sample_hook(config, cfg, encoder, vae_params, workdir, hp)

    state = train_lib._train_loop(
        stage,
        config,
        workdir,
        hp,
        init_fn=init_fn,
        step_fn=step_fn,
        data=train_lib._stage_data(config, "flow", hp),  # text -> image records, as the flow stage
        host_to_batch=host_to_batch,
        frozen=frozen,
        mesh=mesh,
        rules=rules,
        start_from=start_from,
        evaluate=evaluate,
        sample=sample,
    )
    return sharding.to_host(state["ema_params"])


def _consistency_sample_hook(config, cfg: ModelConfig, encoder, vae_params: Any, workdir: Path, hp):
    """`sample(state, step)`: the EMA model's `hp.sample_steps`-step consistency samples ->
    samples/consistency_<step>.png (process 0, on its first device), as `train_lib._sample_hook`."""
    from PIL import Image  # noqa: PLC0415

    from microforge_jax import train_lib  # noqa: PLC0415
    from microforge_jax.pipeline import make_grid  # noqa: PLC0415

    prompts, _ = train_lib._sample_inputs(config, "flow")
    guided = config.sample_cfg != 1.0
    side = config.image_size // cfg.vae.downsample_factor
    noise = sampling.initial_noise(config.seed, len(prompts), (side, side), cfg.latent_channels)
    device = jax.local_devices()[0]
    one_device = sharding.make_mesh(config.sharding.mesh_axes, (1,) * len(config.sharding.mesh_axes), [device])
    rules = sharding.rules_from_config(config.sharding)

    def encode(params: Any, texts: list[str]) -> Text:
        if encoder.trainable:
            ids, mask = encoder.tokenize(texts)
            return Text(*encoder.apply(params["text"], jnp.asarray(ids), jnp.asarray(mask)))
        return Text(*encoder.encode(texts))

    def sample(state, step: int) -> None:
        ema = sharding.to_host(state["ema_params"])
        if jax.process_index() != 0:
            return
        sampler = sampling.get_sampler(
            cfg, int(hp.sample_steps), guidance=guided, shift=float(hp.time_shift), sampler="consistency"
        )
        # Everything on the one device (the loop's training mesh is the current context here).
        params = jax.device_put({"denoiser": ema["denoiser"], "vae": vae_params}, device)
        text = jax.device_put(encode(ema, prompts), device)
        uncond = jax.device_put(encode(ema, [""]), device) if guided else None
        key = jax.device_put(jax.random.fold_in(jax.random.key(config.seed), 1), device)
        with sharding.use_mesh(one_device, rules):
            out = sampler(params, text, uncond, jax.device_put(noise, device), jnp.float32(config.sample_cfg), key=key)
            images = sampling.to_uint8(jax.device_get(out.images_BxHxWx3))
        path = workdir / "samples" / f"consistency_{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_grid(images, cols=len(prompts) // 2)).save(path)

    return sample
