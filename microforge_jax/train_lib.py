"""Training: the seed's curriculum as one trainer — VAE, then rectified flow, then editing.

`train_and_evaluate(config, workdir)` runs `config.stages` in order. Each stage:

    shapes first   jax.eval_shape of the init -> logical specs -> NamedShardings on the mesh
    state          restored from the stage's latest checkpoint (with those shardings), or a
                   jitted init with out_shardings; the Grain iterator is restored with it
    step           one pure function (train_steps) jitted once, explicit shardings, donation
    loop           progress bar; metrics pulled to the host after the next step is dispatched;
                   metrics.jsonl + TensorBoard; checkpoints; SIGTERM saves and exits; a
                   non-finite loss stops the run naming the step

A finished stage is skipped, so running `train.py` again on a run resumes it, and on a finished
run says so. After the VAE stage the latent scale and shift are measured and written into the
run's config.json, which the later stages and the sampler read.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from microforge_jax import checkpoint, losses, optim, sharding, train_steps
from microforge_jax.config import ModelConfig, apply_overrides, load_config
from microforge_jax.data import pipeline
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import build_vae


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the stage and step."""


# ----------------------------------------------------------------------------- the run directory


def prepare_run(config: ml_collections.ConfigDict, workdir: str | Path) -> ml_collections.ConfigDict:
    """Resolves the text encoder, checks a resumed run is the same model, writes config.json.

    Returns the config the run trains with: the requested one, with the text encoder's real
    width and, when resuming, the measured VAE latent scale/shift of the saved run.
    """
    from microforge_jax.text import resolve_text_config  # noqa: PLC0415 (loads transformers)

    workdir = Path(workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    text = resolve_text_config(ModelConfig.from_config(config).text)
    config.model.text.encoder, config.model.text.embed_dim = text.encoder, text.embed_dim
    if (workdir / checkpoint.CONFIG_FILE).is_file():
        saved = checkpoint.read_run_config(workdir)
        checkpoint.check_compatible(saved, config)
        for key in ("scaling_factor", "shift_factor"):  # measured by this run: the saved value wins
            config.model.vae[key] = saved.model.vae[key]
    if jax.process_index() == 0:
        checkpoint.save_run_config(workdir, config)
    return config


def config_for_run(
    name_or_path: str | None, overrides: list[str], workdir: str | None
) -> tuple[ml_collections.ConfigDict, Path]:
    """The config to train with: a named one, or (resuming with no --config) the run's own.

    Overrides apply on top either way, e.g. `train.flow.steps=5000` to train a finished run on.
    """
    if name_or_path is None and workdir is not None and (Path(workdir) / checkpoint.CONFIG_FILE).is_file():
        config = checkpoint.read_run_config(workdir)
        with config.unlocked():
            apply_overrides(config, overrides)
        return config, Path(workdir)
    config = load_config(name_or_path or "nano", overrides)
    return config, Path(workdir or f"runs/{config.name}")


def _mesh(config) -> tuple[Any, Any]:
    return sharding.mesh_from_config(config.sharding), sharding.rules_from_config(config.sharding)


def _abstract_with_shardings(abstract_boxed: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract_boxed), shardings
    )


class _Logger:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, workdir: Path, stage: str):
        self.stage = stage
        self.enabled = jax.process_index() == 0
        self._file = open(workdir / "metrics.jsonl", "a") if self.enabled else None  # noqa: SIM115
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _train_loop(
    stage: str,
    config,
    workdir: Path,
    hp,
    *,
    init_fn,
    step_fn,
    data,
    host_to_batch,
    frozen: Any = None,
    mesh,
    rules,
    start_from: dict[str, Any] | None = None,
) -> Any:
    """The loop shared by all stages; returns the final (unboxed, sharded) train state."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    ckpt = checkpoint.StageCheckpointer(workdir, stage, save_interval_steps=config.checkpoint_every)
    previous_handler = signal.getsignal(signal.SIGTERM)
    stop = checkpoint.install_sigterm_handler(ckpt)
    abstract = jax.eval_shape(init_fn)
    state_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
    iterator = iter(data)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(None, _abstract_with_shardings(abstract, state_shardings), data_iterator=iterator)
    else:
        with nn.logical_axis_rules(rules):
            state = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=state_shardings)()
        for key, values in (start_from or {}).items():  # e.g. the edit stage starts from the flow model
            state[key] = jax.tree.map(jax.device_put, values, state_shardings[key])
    start = int(state["step"])
    if start >= hp.steps:
        print(f"[{stage}] already trained ({start}/{hp.steps} steps)")
        ckpt.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)
        return state

    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
    rng = jax.device_put(
        jax.random.fold_in(jax.random.key(config.seed), ("vae", "flow", "edit", "distill").index(stage)), replicated
    )

    step_jit = None
    logger = _Logger(workdir, stage)
    pbar = tqdm(total=hp.steps, initial=start, desc=stage, unit="step", dynamic_ncols=True, disable=jax.process_index())
    pending, t_last, s_last = None, time.perf_counter(), start

    def finish(step_metrics) -> None:
        """Host side of a dispatched step: finiteness and logging (runs one step behind)."""
        nonlocal t_last, s_last
        step, metrics = step_metrics
        values = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(values["train/loss"]):
            raise TrainingError(f"[{stage}] non-finite loss ({values['train/loss']}) at step {step}; stopping")
        pbar.update(1)
        if step % config.log_every == 0 or step == hp.steps:
            now = time.perf_counter()
            values["train/steps_per_sec"] = (step - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, step
            logger.write(step, values)
            pbar.set_postfix(
                {k.removeprefix("train/"): f"{v:.4g}" for k, v in values.items() if "loss" in k or "psnr" in k}
            )

    step = start
    try:
        with sharding.use_mesh(mesh, rules):
            for step in range(start, hp.steps):
                batch = host_to_batch(next(iterator))
                if step_jit is None:
                    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
                    step_jit = jax.jit(
                        step_fn,
                        in_shardings=(state_shardings, batch_shardings, replicated, frozen_shardings),
                        out_shardings=(state_shardings, replicated),
                        donate_argnums=(0,),
                    )
                state, metrics = step_jit(state, batch, rng, frozen)
                if pending is not None:
                    finish(pending)
                pending = (step + 1, metrics)
                ckpt.save(step + 1, state, iterator)
                if stop.is_set():
                    print(f"[{stage}] SIGTERM: saving step {step + 1} and stopping")
                    break
            if pending is not None:
                finish(pending)
        ckpt.save(int(state["step"]), state, iterator, force=True)
        ckpt.wait_until_finished()
    finally:
        pbar.close()
        logger.close()
        ckpt.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)
    if stop.is_set():
        raise SystemExit(143)
    return state


# ----------------------------------------------------------------------------- stages


def _stage_data(config, stage: str, hp):
    return pipeline.shapes_dataset(
        stage,
        batch_size=hp.batch_size,
        seed=config.seed,
        image_size=config.image_size,
        data_seed=config.data.seed,
        worker_count=config.data.worker_count,
        weights=tuple(hp.task_weights) if stage == "edit" else None,
    )


def run_vae_stage(config, workdir: Path, mesh, rules) -> Any:
    hp = config.train.vae
    cfg = ModelConfig.from_config(config)
    vae = build_vae(cfg)
    disc = losses.PatchDiscriminator(hp.disc_channels, dtype=jnp.dtype(cfg.dtype))
    tx = optim.make_optimizer(hp)
    disc_tx = optim.make_optimizer(ml_collections.ConfigDict({**hp.to_dict(), "lr": hp.disc_lr, "ssm_lr_mult": 1.0}))
    local = pipeline.per_process_batch_size(hp.batch_size, jax.process_count())
    example = jnp.zeros((local, config.image_size, config.image_size, 3), jnp.float32)

    def init_fn():
        r_vae, r_disc = jax.random.split(jax.random.key(config.seed))
        params = vae.init(r_vae, example)
        disc_params = disc.init(r_disc, example)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "ema_params": params,
            "opt_state": tx.init(params),
            "disc_params": disc_params,
            "disc_opt_state": disc_tx.init(disc_params),
        }

    spec = train_steps.VAEStep(vae, disc, tx, disc_tx, hp)
    step_fn = lambda state, batch, rng, frozen: train_steps.vae_train_step(spec, state, batch, rng)
    state = _train_loop(
        "vae",
        config,
        workdir,
        hp,
        init_fn=init_fn,
        step_fn=step_fn,
        data=_stage_data(config, "vae", hp),
        host_to_batch=lambda b: sharding.shard_batch({"image": b["image"]}, mesh, rules),
        frozen={},
        mesh=mesh,
        rules=rules,
    )
    return jax.device_get(state["ema_params"])


def measure_latent_stats(config, vae_params, mesh, rules) -> tuple[float, float]:
    """The VAE latent's scale and shift over a few training batches: 1 / std and mean."""
    cfg = ModelConfig.from_config(config)
    vae = build_vae(cfg)
    hp = config.train.vae
    data = iter(_stage_data(config, "vae", hp))
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode).mode())
    zs = [np.asarray(encode(vae_params, next(data)["image"])) for _ in range(max(1, hp.scale_batches))]
    z = np.concatenate(zs).astype(np.float64)
    return float(1.0 / max(z.std(), 1e-6)), float(z.mean())


def run_flow_stage(stage: str, config, workdir: Path, mesh, rules, vae_params: Any) -> Any:
    """The flow stage (text -> image) or the edit stage (source + instruction -> image)."""
    from microforge_jax.text import TextEmbeddingCache, load_text_encoder  # noqa: PLC0415

    hp = config.train[stage]
    cfg = ModelConfig.from_config(config)
    denoiser = build_denoiser(cfg)
    vae = build_vae(cfg)
    encoder = load_text_encoder(cfg.text, dtype=jnp.float32)
    trainable_text = encoder.trainable
    tx = optim.make_optimizer(hp)
    local = pipeline.per_process_batch_size(hp.batch_size, jax.process_count())
    f = cfg.vae.downsample_factor
    side = config.image_size // f
    z = jnp.zeros((local, side, side, cfg.latent_channels), jnp.float32)
    t = jnp.zeros((local,), jnp.float32)
    m, e = encoder.max_length, encoder.embed_dim
    text = Text(jnp.zeros((local, m, e)), jnp.ones((local, m), bool), jnp.zeros((local, e)))

    start_from = None
    if stage == "edit" and checkpoint.latest_steps(workdir).get("flow") is not None:
        start_from = checkpoint.restore_stage_params(workdir, "flow")  # editing starts from the trained flow model

    def init_fn():
        r_den, r_text = jax.random.split(jax.random.key(config.seed + 1))
        params = {"denoiser": denoiser.init(r_den, z, t, text)}
        if trainable_text:
            params["text"] = encoder.init(r_text)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}

    spec = train_steps.FlowStep(
        denoiser,
        vae,
        tx,
        hp,
        latent_scale=float(cfg.vae.scaling_factor),
        latent_shift=float(cfg.vae.shift_factor),
        diversity_weight=float(cfg.planner.diversity_weight),
        text_module=encoder if trainable_text else None,
    )
    step_fn = lambda state, batch, rng, frozen: train_steps.flow_train_step(spec, state, batch, rng, frozen)
    if trainable_text:
        ids, mask = encoder.tokenize([""])
        frozen = {"vae": vae_params, "empty_ids": ids, "empty_mask": mask}
    else:
        empty = encoder.encode([""])
        frozen = {"vae": vae_params, "empty_text": Text(empty.tokens_BxMxD, empty.mask_BxM, empty.pooled_BxD)}
    cache = TextEmbeddingCache(encoder) if not trainable_text and hp.text_cache else None

    def host_to_batch(b):
        prompts = [str(s) for s in b["text"]]
        out = {"image": b["image"]}
        if stage == "edit":
            out.update(source=b["source"], task=b["task"])
        if trainable_text:
            out["text_ids"], out["text_mask"] = encoder.tokenize(prompts)
        else:
            emb = cache.lookup(prompts) if cache is not None else jax.device_get(encoder.encode(prompts))
            out.update(text_tokens=emb.tokens_BxMxD, text_mask=emb.mask_BxM, text_pooled=emb.pooled_BxD)
        return sharding.shard_batch(out, mesh, rules)

    state = _train_loop(
        stage,
        config,
        workdir,
        hp,
        init_fn=init_fn,
        step_fn=step_fn,
        data=_stage_data(config, stage, hp),
        host_to_batch=host_to_batch,
        frozen=frozen,
        mesh=mesh,
        rules=rules,
        start_from=start_from,
    )
    return jax.device_get(state["ema_params"])


# ----------------------------------------------------------------------------- the curriculum


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs the config's stages in order, each resuming from its checkpoints; returns a summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = prepare_run(config, workdir)
    mesh, rules = _mesh(config)
    summary: dict[str, Any] = {"workdir": str(workdir)}
    vae_params = None
    for stage in config.stages:
        t0 = time.perf_counter()
        if stage == "vae":
            vae_params = run_vae_stage(config, workdir, mesh, rules)
            if config.model.vae.scaling_factor == 1.0 and config.model.vae.shift_factor == 0.0:
                scale, shift = measure_latent_stats(config, vae_params, mesh, rules)
                config.model.vae.scaling_factor, config.model.vae.shift_factor = scale, shift
                if jax.process_index() == 0:
                    checkpoint.save_run_config(workdir, config)
                print(f"[vae] latent scale {scale:.4f}, shift {shift:.4f} (saved in config.json)")
        elif stage in ("flow", "edit"):
            if vae_params is None:
                _, loaded = checkpoint.load_run(workdir)
                if "vae" not in loaded:
                    raise checkpoint.RunError(f"stage {stage!r} needs a trained VAE: run the 'vae' stage first")
                vae_params = loaded["vae"]
            run_flow_stage(stage, config, workdir, mesh, rules, vae_params)
        else:
            raise ValueError(f"unknown stage {stage!r}; stages are vae, flow, edit")
        summary[f"{stage}_seconds"] = time.perf_counter() - t0
    return summary


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """`jax.distributed.initialize` when a coordinator is given (or a cluster is detected).

    On a TPU pod slice or a SLURM/Kubernetes GPU cluster JAX finds the coordinator itself; on a
    CPU the processes use the gloo collectives.
    """
    if coordinator is None and num_processes is None:
        return
    if jax.default_backend() == "cpu" or not jax.devices():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
