"""Training: the seed's curriculum as one trainer — VAE, then rectified flow, then editing.

`train_and_evaluate(config, workdir)` runs `config.stages` in order. Each stage:

    shapes first   jax.eval_shape of the init -> logical specs -> NamedShardings on the mesh
    state          restored from the stage's latest checkpoint (with those shardings), or a
                   jitted init with out_shardings; the Grain iterator is restored with it
    step           one pure function (train_steps) jitted once, explicit shardings, donation
    loop           progress bar; metrics pulled to the host after the next step is dispatched;
                   metrics.jsonl + TensorBoard; checkpoints; SIGTERM saves and exits (on
                   several hosts, all agree on the step first); a non-finite loss stops the
                   run naming the step

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

from microforge_jax import checkpoint, losses, optim, sampling, sharding, train_steps
from microforge_jax.config import ConfigError, ModelConfig, apply_overrides, load_config
from microforge_jax.data import imagefolder, pipeline
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import build_vae


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the stage and step."""


# Model keys that change how the model computes, not its parameters: a run may resume (or
# `init_from` another run) with a different value.
RUNTIME_MODEL_KEYS: tuple[tuple[str, str], ...] = (("backbone", "remat"),)
VAL_TIMES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # the fixed flow times of the validation loss
NUM_SAMPLES = 8  # images in a sample grid


# ----------------------------------------------------------------------------- the run directory


def prepare_run(config: ml_collections.ConfigDict, workdir: str | Path) -> ml_collections.ConfigDict:
    """Resolves the text encoder, checks a resumed run is the same model, writes config.json.

    Returns the config the run trains with: the requested one, with the text encoder's real
    width and, when resuming, the measured VAE latent scale/shift of the saved run.
    """
    from microforge_jax.text import resolve_text_config  # noqa: PLC0415 (loads transformers)

    workdir = Path(workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    model_cfg = ModelConfig.from_config(config)
    f, p = model_cfg.vae.downsample_factor, model_cfg.backbone.patch_size
    if config.image_size < 1 or config.image_size % (f * p):  # else the model's init fails mid-run
        why = "the VAE's compression factor" + (f" {f} x model.backbone.patch_size {p}" if p > 1 else "")
        raise ConfigError(f"image_size {config.image_size} must be a positive multiple of {f * p} ({why})")
    text = resolve_text_config(model_cfg.text)
    config.model.text.encoder, config.model.text.embed_dim = text.encoder, text.embed_dim
    stages = tuple(config.stages)
    unknown = [s for s in stages if s not in checkpoint.STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; stages are {', '.join(checkpoint.STAGES)}")
    if list(stages) != sorted(stages, key=checkpoint.STAGES.index) or len(set(stages)) != len(stages):
        raise ConfigError(
            f"stages {stages} must keep the curriculum's order {' -> '.join(checkpoint.STAGES)} "
            "(each stage starts from the weights of the one before it), each at most once"
        )
    if "flow_hr" in stages:
        size = int(config.train.flow_hr.image_size)
        if size < 1 or size % (f * p):
            raise ConfigError(f"train.flow_hr.image_size {size} must be a positive multiple of {f * p}")
    if config.data.source not in ("shapes", "folder"):
        raise ConfigError(f"data.source must be 'shapes' or 'folder', got {config.data.source!r}")
    if not config.train.flow.get("object_cell_weight", 1.0) > 0:
        raise ConfigError(f"train.flow.object_cell_weight must be > 0, got {config.train.flow.object_cell_weight}")
    if config.data.source == "folder":
        imagefolder.scan_folder(config.data.path)  # a missing or empty folder fails before anything is written
    started = set(checkpoint.latest_steps(workdir)) & set(checkpoint.DENOISER_STAGES)
    if config.get("init_from") and not started:  # once the run has a denoiser, init_from is history
        source = Path(config.init_from)
        _check_model(checkpoint.read_run_config(source), config, where=f"the --init_from run {source}")
        if not set(checkpoint.latest_steps(source)) & set(checkpoint.DENOISER_STAGES):
            raise checkpoint.RunError(f"--init_from run {source} has no flow or edit checkpoint to start from")
        if "vae" not in config.stages and "vae" not in checkpoint.latest_steps(workdir):
            _copy_vae(source, workdir, config)
    if (workdir / checkpoint.CONFIG_FILE).is_file():
        saved = checkpoint.read_run_config(workdir)
        _check_model(saved, config)
        for key in ("scaling_factor", "shift_factor"):  # measured by this run: the saved value wins
            config.model.vae[key] = saved.model.vae[key]
    if jax.process_index() == 0:
        checkpoint.save_run_config(workdir, config)
    return config


def _copy_vae(source: Path, workdir: Path, config: ml_collections.ConfigDict) -> None:
    """`init_from` without a "vae" stage: the source run's VAE checkpoints and latent scale/shift.

    The denoiser was trained in that VAE's latent space, and a copy keeps this run self-contained
    (`load_run` finds its VAE here).
    """
    import shutil  # noqa: PLC0415

    if "vae" not in checkpoint.latest_steps(source):
        raise checkpoint.RunError(f"--init_from run {source} has no VAE checkpoint; add 'vae' to stages")
    if jax.process_index() == 0:
        target = workdir / checkpoint.CHECKPOINT_DIR / "vae"
        shutil.rmtree(target, ignore_errors=True)  # no finished step there (checked above): a partial copy
        shutil.copytree(source / checkpoint.CHECKPOINT_DIR / "vae", target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("init_from: VAE copied")
    saved = checkpoint.read_run_config(source)
    for key in ("scaling_factor", "shift_factor"):
        config.model.vae[key] = saved.model.vae[key]
    print(f"[vae] copied from {source} (latent scale {config.model.vae.scaling_factor:.4f})")


def _check_model(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, **kw: Any) -> None:
    """`checkpoint.check_compatible`, ignoring the RUNTIME_MODEL_KEYS (absent in older runs too)."""
    saved = ml_collections.ConfigDict(saved.to_dict())
    for section, key in RUNTIME_MODEL_KEYS:
        if section in saved.model and key in config.model[section]:
            saved.model[section][key] = config.model[section][key]
    checkpoint.check_compatible(saved, config, **kw)


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
    evaluate: Any = None,
    sample: Any = None,
) -> Any:
    """The loop shared by all stages; returns the final (unboxed, sharded) train state.

    `evaluate(state) -> {"val/...": float}` and `sample(state, step)` (both called by every
    process) run every `config.eval_every` / `config.sample_every` steps and after the last step.
    Batches with a `skipped` field (unreadable images replaced by the source) are counted into
    `data/skipped`.
    """
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
            if isinstance(values, dict) and isinstance(state[key], dict):
                # Named trees by name: one this stage lacks (the flow stage's training-only attribute
                # head) is dropped, one it adds keeps its initialisation.
                new = dict(state[key])
                for name, tree in values.items():
                    if name in new:
                        new[name] = sharding.put_global(tree, state_shardings[key][name])
                state[key] = new
            else:
                state[key] = sharding.put_global(values, state_shardings[key])
    start = int(state["step"])
    if 0 < start < hp.steps:
        print(f"[{stage}] restored step {start}, {hp.steps - start} steps to go")
    if start >= hp.steps:
        print(f"[{stage}] already trained ({start}/{hp.steps} steps)")
        ckpt.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)
        return state

    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
    frozen = sharding.put_global(frozen, frozen_shardings)
    rng = sharding.put_global(
        jax.random.fold_in(jax.random.key(config.seed), checkpoint.STAGES.index(stage)), replicated
    )

    step_jit = None
    stopping = False  # SIGTERM: the agreed decision (all processes alike), not this host's own flag
    stop_every = int(config.get("stop_check_every", checkpoint.STOP_CHECK_EVERY))  # .get: older runs
    logger = _Logger(workdir, stage)
    pbar = tqdm(total=hp.steps, initial=start, desc=stage, unit="step", dynamic_ncols=True, disable=jax.process_index())
    pending, t_last, s_last = None, time.perf_counter(), start
    skipped, counts_skips = 0, False

    def finish(step_metrics) -> None:
        """Host side of a dispatched step: finiteness and logging (runs one step behind)."""
        nonlocal t_last, s_last
        step, metrics, skipped_so_far = step_metrics
        values = {k: float(v) for k, v in metrics.items()}
        if counts_skips:
            values["data/skipped"] = float(skipped_so_far)
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
                raw = next(iterator)
                if "skipped" in raw:  # unreadable images, counted in the records (worker-side counters are lost)
                    skipped, counts_skips = skipped + int(np.sum(raw["skipped"])), True
                batch = host_to_batch(raw)
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
                pending = (step + 1, metrics, skipped)
                _periodic(step + 1, hp.steps, config, state, logger, evaluate, sample)
                ckpt.save(step + 1, state, iterator)
                # Multi-host: every `stop_every` steps and at the last one, all processes OR their
                # SIGTERM flags, so they stop at the same step and save it together.
                check_at = None if step + 1 == hp.steps else step + 1
                if checkpoint.agree_to_stop(stop.is_set(), check_at, stop_every):
                    stopping = True
                    print(f"[{stage}] SIGTERM: saving step {step + 1} and stopping")
                    break
            if pending is not None:
                finish(pending)
            if not stopping:
                _periodic(int(state["step"]), hp.steps, config, state, logger, evaluate, sample, final=True)
        if skipped and jax.process_index() == 0:
            print(f"[{stage}] skipped {skipped} unreadable images (replaced by the next readable one)")
        ckpt.save(int(state["step"]), state, iterator, force=True)
        ckpt.wait_until_finished()
        if not stopping:  # a SIGTERM during the final evaluation or save: the stage is done, stop after it
            stopping = checkpoint.agree_to_stop(stop.is_set())
    finally:
        pbar.close()
        logger.close()
        ckpt.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)
    if stopping:
        raise SystemExit(143)
    return state


def _periodic(step: int, total: int, config, state, logger, evaluate, sample, final: bool = False) -> None:
    """The validation loss and the sample grid, every eval_every / sample_every steps and at the end."""
    due = lambda every: final or (every > 0 and step % every == 0 and step < total)
    if evaluate is not None and due(config.get("eval_every", 0)):  # .get: runs saved before the key existed
        values = evaluate(state)
        logger.write(step, values)
        if jax.process_index() == 0:
            print(f"[{logger.stage}] step {step}: val/loss {values['val/loss']:.4f}")
    if sample is not None and due(config.get("sample_every", 0)):
        sample(state, step)


# ----------------------------------------------------------------------------- stages


def _stage_data(config, stage: str, hp, split: str = "train"):
    """A stage's batches: the shapes world or `data.path`; split "val" is fixed (no shuffle).

    A folder has no split of its own: its "val" batches are its first images in file order
    (a fixed set, but seen in training). `hp.objects_p` (flow stage) sets the object-count mix
    of the training scenes only: validation keeps the world's own mix.
    """
    stage = "flow" if stage == "flow_hr" else stage  # the same records, at the stage's image size
    kw: dict[str, Any] = {"worker_count": config.data.worker_count}
    if split != "train":
        kw.update(shuffle=False, worker_count=0, read_threads=0)
    elif hp.get("objects_p") is not None and config.data.source == "shapes":  # .get: other stages, older runs
        kw.update(objects_p=tuple(hp.objects_p))
    if config.data.source == "folder":
        return imagefolder.folder_dataset(
            stage, config.data.path, batch_size=hp.batch_size, seed=config.seed, image_size=config.image_size, **kw
        )
    return pipeline.shapes_dataset(
        stage,
        batch_size=hp.batch_size,
        seed=config.seed,
        image_size=config.image_size,
        data_seed=config.data.seed,
        split=split,
        weights=tuple(hp.task_weights) if stage == "edit" else None,
        **kw,
    )


def _sample_inputs(config, stage: str) -> tuple[list[str], np.ndarray | None]:
    """The fixed prompts (and, for edit, uint8 sources) of the sample grids: 8 held-out records."""
    if config.data.source == "folder":
        source = imagefolder.ImageFolderSource(config.data.path, config.image_size)
        return [source.entries[i % len(source)][1] for i in range(NUM_SAMPLES)], None
    from microforge_jax.data.shapes import ShapesSource  # noqa: PLC0415

    task = "edit" if stage == "edit" else "generate"
    src = ShapesSource(task, "val", config.image_size, NUM_SAMPLES, config.data.seed)
    records = [src[i] for i in range(NUM_SAMPLES)]
    sources = np.stack([r["source"] for r in records]) if stage == "edit" else None
    return [str(r["text"]) for r in records], sources


def run_vae_stage(config, workdir: Path, mesh, rules) -> Any:
    hp = config.train.vae
    cfg = ModelConfig.from_config(config)
    if cfg.vae.kind == "pixel":
        print("[vae] skipped: model.vae.kind='pixel' has no autoencoder to train")
        return {}
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

    if hp.get("pretrained", "") and checkpoint.latest_steps(workdir).get("vae") is None:
        _start_from_pretrained_vae(config, workdir, hp, init_fn)
    finished = checkpoint.latest_steps(workdir).get("vae", -1) >= hp.steps  # then no step runs: nothing to load
    frozen, lpips_module = _perceptual(hp, load=not finished)  # a bad LPIPS file fails here, before any training
    spec = train_steps.VAEStep(vae, disc, tx, disc_tx, hp, lpips=lpips_module)
    step_fn = lambda state, batch, rng, frozen: train_steps.vae_train_step(spec, state, batch, rng, frozen)
    state = _train_loop(
        "vae",
        config,
        workdir,
        hp,
        init_fn=init_fn,
        step_fn=step_fn,
        data=_stage_data(config, "vae", hp),
        host_to_batch=lambda b: sharding.shard_batch({"image": b["image"]}, mesh, rules),
        frozen=frozen,
        mesh=mesh,
        rules=rules,
    )
    return sharding.to_host(state["ema_params"])


def _start_from_pretrained_vae(config, workdir: Path, hp, init_fn) -> None:
    """`train.vae.pretrained`: writes those weights as the stage's finished checkpoint (step = steps)
    and their latent scale/shift into config.json, so the stage trains nothing and the run stays
    self-contained."""
    from microforge_jax import vae_weights  # noqa: PLC0415

    abstract = nn.unbox(jax.eval_shape(init_fn))
    try:
        params, meta = vae_weights.load(hp.pretrained, abstract["params"])
    except vae_weights.WeightsError as e:
        raise ConfigError(str(e)) from None
    v = config.model.vae
    if (v.scaling_factor, v.shift_factor) == (1.0, 0.0) and "scaling_factor" in meta:
        with config.unlocked():
            v.scaling_factor, v.shift_factor = float(meta["scaling_factor"]), float(meta["shift_factor"])
        if jax.process_index() == 0:
            checkpoint.save_run_config(workdir, config)
    state = dict(jax.jit(lambda: nn.unbox(init_fn()))(), params=params, ema_params=params)
    state["step"] = jnp.asarray(hp.steps, jnp.int32)
    with checkpoint.StageCheckpointer(workdir, "vae", async_save=False) as ckpt:
        ckpt.save(hp.steps, state, data_iterator=iter(_stage_data(config, "vae", hp)), force=True)
    print(
        f"[vae] weights from {vae_weights.resolve(hp.pretrained)} (latent scale {v.scaling_factor:.4f}, shift {v.shift_factor:.4f})"
    )


def _perceptual(hp, load: bool = True) -> tuple[dict[str, Any], Any]:
    """The VAE stage's frozen inputs and LPIPS module: ({"lpips": weights}, LPIPS()) or ({}, None)."""
    kind = hp.get("perceptual", "gradient")  # .get: runs saved before the key existed
    if kind not in losses.PERCEPTUAL_KINDS:
        raise ConfigError(f"train.vae.perceptual must be one of {', '.join(losses.PERCEPTUAL_KINDS)}, got {kind!r}")
    if kind != "lpips" or not load:
        return {}, None
    from microforge_jax import lpips  # noqa: PLC0415

    weights = lpips.load_weights(hp.get("lpips_weights", ""))
    print(f"[vae] perceptual loss: LPIPS-VGG from {hp.lpips_weights}")
    return {"lpips": weights}, lpips.LPIPS()


def _ensure_latent_stats(config, workdir: Path, vae_params: Any, mesh, rules) -> None:
    """Measures the latent scale/shift into config.json unless the run already has them (not 1 and 0)."""
    if config.model.vae.scaling_factor != 1.0 or config.model.vae.shift_factor != 0.0:
        return
    if config.model.vae.get("kind", "dc") == "pixel":  # images in [-1, 1] as they are, as JiT
        return
    scale, shift = measure_latent_stats(config, vae_params, mesh, rules)
    config.model.vae.scaling_factor, config.model.vae.shift_factor = scale, shift
    if jax.process_index() == 0:
        checkpoint.save_run_config(workdir, config)
    print(f"[vae] latent scale {scale:.4f}, shift {shift:.4f} (saved in config.json)")


def measure_latent_stats(config, vae_params, mesh, rules) -> tuple[float, float]:
    """The VAE latent's scale and shift over a few training batches: 1 / std and mean."""
    cfg = ModelConfig.from_config(config)
    vae = build_vae(cfg)
    hp = config.train.vae
    data = iter(_stage_data(config, "vae", hp))
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode).mode())
    zs = [np.asarray(encode(vae_params, next(data)["image"])) for _ in range(max(1, hp.scale_batches))]
    z = np.concatenate(zs)
    if jax.process_count() > 1:  # each process read its own part of the batches: pool them, so all agree
        from jax.experimental import multihost_utils  # noqa: PLC0415

        z = np.asarray(multihost_utils.process_allgather(z))
    z = z.astype(np.float64)
    return float(1.0 / max(z.std(), 1e-6)), float(z.mean())


def run_flow_stage(stage: str, config, workdir: Path, mesh, rules, vae_params: Any) -> Any:
    """The flow stage (text -> image) or the edit stage (source + instruction -> image)."""
    from microforge_jax.text import TextEmbeddingCache, load_text_encoder  # noqa: PLC0415

    hp = config.train[stage]
    if stage == "flow_hr":  # the flow at a larger image size: positions and scan paths work at any grid
        config = ml_collections.ConfigDict(config.to_dict())
        config.image_size = int(hp.image_size)
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
    before = {"flow_hr": ("flow",), "edit": ("flow_hr", "flow")}.get(stage, ())
    previous = next((s for s in before if checkpoint.latest_steps(workdir).get(s) is not None), None)
    if previous is not None:  # the high-resolution flow and editing start from the latest flow model
        start_from = checkpoint.restore_stage_params(workdir, previous)
    elif config.get("init_from") and checkpoint.latest_steps(workdir).get(stage) is None:
        start_from = _init_from_params(Path(config.init_from), stage)

    attr_weight = float(hp.get("attribute_weight", 0.0))  # .get: the edit stage and older runs have no such key
    attribute_head = losses.AttributeHead(cfg.backbone.dim) if attr_weight > 0 else None
    if attribute_head is not None and not 0 <= int(hp.attribute_block) < cfg.backbone.depth:
        raise ConfigError(
            f"train.{stage}.attribute_block must be a block index in [0, {cfg.backbone.depth}), got {hp.attribute_block}"
        )

    def init_fn():
        r_den, r_text = jax.random.split(jax.random.key(config.seed + 1))
        params = {"denoiser": denoiser.init(r_den, z, t, text)}
        if trainable_text:
            params["text"] = encoder.init(r_text)
        if attribute_head is not None:  # training-only: load_run never returns it
            tokens = jnp.zeros((1, 1, cfg.backbone.dim), jnp.float32)
            params[checkpoint.ATTRIBUTE_HEAD] = attribute_head.init(jax.random.key(config.seed + 2), tokens)
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
        attribute_head=attribute_head,
    )
    step_fn = lambda state, batch, rng, frozen: train_steps.flow_train_step(spec, state, batch, rng, frozen)
    if trainable_text:
        ids, mask = encoder.tokenize([""])
        frozen = {"vae": vae_params, "empty_ids": ids, "empty_mask": mask}
    else:
        empty = encoder.encode([""])
        frozen = {"vae": vae_params, "empty_text": Text(empty.tokens_BxMxD, empty.mask_BxM, empty.pooled_BxD)}
    cache = TextEmbeddingCache(encoder) if not trainable_text and hp.text_cache else None
    latents = None
    if hp.get("cache_latents", False):  # .get: the edit stage and older runs have no such key
        from microforge_jax.latent_cache import LatentCache, vae_encoder  # noqa: PLC0415

        latents = LatentCache(vae_encoder(vae, vae_params, tuple(config.sharding.mesh_axes), rules))
        if config.data.source == "shapes" and jax.process_index() == 0:
            print(f"[{stage}] cache_latents: the shapes world never repeats a record, so the cache only grows")

    def host_to_batch(b, cache_latents: bool = True):
        prompts = [str(s) for s in b["text"]]
        out = {"image": b["image"]}
        if latents is not None and cache_latents:  # the frozen VAE's posterior moments instead of the image
            mean, logvar = latents.lookup(b["image"])
            out = {"latent_mean": mean, "latent_logvar": logvar}
        if stage == "edit":
            out.update(source=b["source"], task=b["task"])
        elif "cells" in b and hp.get("object_cell_weight", 1.0) != 1.0:
            out["cells"] = b["cells"]
        if attribute_head is not None and "attrs" in b:
            out["attrs"] = b["attrs"]
        texts = {"text": prompts}
        if stage == "edit" and hp.get("generate_weight", 0.0) > 0:  # the targets' captions, for the generate term
            texts["gen_text"] = [str(s) for s in b["caption"]]
        for key, strings in texts.items():
            if trainable_text:
                out[f"{key}_ids"], out[f"{key}_mask"] = encoder.tokenize(strings)
            else:
                emb = cache.lookup(strings) if cache is not None else jax.device_get(encoder.encode(strings))
                out.update(
                    {f"{key}_tokens": emb.tokens_BxMxD, f"{key}_mask": emb.mask_BxM, f"{key}_pooled": emb.pooled_BxD}
                )
        return sharding.shard_batch(out, mesh, rules)

    # ---- validation loss: fixed held-out batches and noise, the EMA params, t in VAL_TIMES
    val_iter = iter(_stage_data(config, stage, hp, split="val"))
    val_batches = [host_to_batch(next(val_iter), False) for _ in range(max(1, config.get("eval_batches", 2)))]
    val_fn = jax.jit(
        lambda params, batch, key, frz: train_steps.flow_val_losses(spec, params, batch, key, frz, VAL_TIMES)
    )

    def evaluate(state) -> dict[str, float]:
        key = jax.random.key(config.seed + 7)
        per_t = np.mean(
            [
                np.asarray(val_fn(state["ema_params"], b, jax.random.fold_in(key, i), frozen_on_mesh))
                for i, b in enumerate(val_batches)
            ],
            axis=0,
        )
        return {"val/loss": float(per_t.mean()), **{f"val/loss_t{t:g}": float(v) for t, v in zip(VAL_TIMES, per_t)}}

    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_on_mesh = sharding.put_global(frozen, jax.tree.map(lambda _: replicated, frozen))
    sample = _sample_hook(stage, config, cfg, encoder, vae_params, workdir, hp)

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
        evaluate=evaluate,
        sample=sample,
    )
    if latents is not None and jax.process_index() == 0:
        print(f"[{stage}] latent cache: {latents.summary()}")
    return sharding.to_host(state["ema_params"])


def _init_from_params(source: Path, stage: str) -> dict[str, Any]:
    """`init_from`: params and EMA from another run's latest denoiser EMA (this stage's, else the other one's)."""
    steps = checkpoint.latest_steps(source)
    order = (stage, *(s for s in checkpoint.DENOISER_STAGES if s != stage))
    found = next((s for s in order if s in steps), None)
    if found is None:
        raise checkpoint.RunError(f"--init_from run {source} has no flow or edit checkpoint to start from")
    ema = checkpoint.restore_stage_params(source, found, ("ema_params",))["ema_params"]
    print(f"[{stage}] initialised from {source} ({found} EMA, step {steps[found]})")
    return {"params": ema, "ema_params": ema}


def _sample_hook(stage: str, config, cfg: ModelConfig, encoder, vae_params: Any, workdir: Path, hp):
    """`sample(state, step)`: a grid of the EMA model's samples -> samples/<stage>_<step>.png (process 0).

    Every process gathers the EMA params (a collective when they span processes); process 0 then
    samples on its first device, outside the training mesh.
    """
    from PIL import Image  # noqa: PLC0415

    from microforge_jax.pipeline import make_grid  # noqa: PLC0415

    prompts, sources = _sample_inputs(config, stage)
    guided = config.sample_cfg != 1.0
    side = config.image_size // cfg.vae.downsample_factor
    noise = sampling.initial_noise(config.seed, NUM_SAMPLES, (side, side), cfg.latent_channels)
    device = jax.local_devices()[0]
    one_device = sharding.make_mesh(config.sharding.mesh_axes, (1,) * len(config.sharding.mesh_axes), [device])
    rules = sharding.rules_from_config(config.sharding)

    def encode(params: Any, texts: list[str]) -> Text:
        if encoder.trainable:  # the "simple" encoder trains with the backbone: its EMA weights
            ids, mask = encoder.tokenize(texts)
            return Text(*encoder.apply(params["text"], jnp.asarray(ids), jnp.asarray(mask)))
        return Text(*encoder.encode(texts))

    def sample(state, step: int) -> None:
        ema = sharding.to_host(state["ema_params"])
        if jax.process_index() != 0:
            return
        sampler = sampling.get_sampler(
            cfg, config.sample_steps, guidance=guided, shift=float(hp.time_shift), with_source=sources is not None
        )
        with sharding.use_mesh(one_device, rules):
            args = [
                {"denoiser": ema["denoiser"], "vae": vae_params},
                encode(ema, prompts),
                encode(ema, [""]) if guided else None,
                noise,
                jnp.float32(config.sample_cfg),
            ]
            if sources is not None:
                args += [jnp.asarray(sampling.from_uint8(sources)), jnp.int32(sampling.task_id("edit"))]
            # Everything on this process's first device: the text encoder's outputs may be on the mesh.
            images = sampler(*jax.device_put(args, device)).images_BxHxWx3
            images = sampling.to_uint8(jax.device_get(images))
        if sources is not None:  # the sources above their edits
            images = np.concatenate([sources, images])
        out = workdir / "samples" / f"{stage}_{step}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_grid(images, cols=NUM_SAMPLES if sources is not None else NUM_SAMPLES // 2)).save(out)

    return sample


# ----------------------------------------------------------------------------- the curriculum


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs the config's stages in order, each resuming from its checkpoints; returns a summary."""
    workdir = Path(workdir)
    config = prepare_run(config, workdir)  # checks the input first: a refused run creates nothing
    workdir.mkdir(parents=True, exist_ok=True)
    mesh, rules = _mesh(config)
    summary: dict[str, Any] = {"workdir": str(workdir)}
    vae_params = None
    for stage in config.stages:
        t0 = time.perf_counter()
        if stage == "vae":
            vae_params = run_vae_stage(config, workdir, mesh, rules)
            _ensure_latent_stats(config, workdir, vae_params, mesh, rules)
        elif stage == "edit" and config.data.source == "folder":
            print("[edit] skipped: a folder of captioned images has no edit pairs (data.source='folder')")
            continue
        elif stage in ("flow", "flow_hr", "edit", "distill", "consistency"):
            if vae_params is None and config.model.vae.get("kind", "dc") == "pixel":
                vae_params = {}  # pixel space: nothing to load
            if vae_params is None:
                _, loaded = checkpoint.load_run(workdir)
                if "vae" not in loaded:
                    raise checkpoint.RunError(f"stage {stage!r} needs a trained VAE: run the 'vae' stage first")
                vae_params = loaded["vae"]
                # A VAE checkpoint without its measured scale (a run directory put together by
                # hand, without config.json): measure it now rather than train on raw latents.
                _ensure_latent_stats(config, workdir, vae_params, mesh, rules)
            if stage in ("flow", "flow_hr", "edit"):
                run_flow_stage(stage, config, workdir, mesh, rules, vae_params)
            else:
                from microforge_jax import distill  # noqa: PLC0415 (it imports this module)

                distill.run_distill_stage(stage, config, workdir, mesh, rules, vae_params)
        else:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(checkpoint.STAGES)}")
        summary[f"{stage}_seconds"] = time.perf_counter() - t0
    ev = config.get("final_eval")
    if ev is not None and ev.num > 0 and jax.process_index() == 0:
        from microforge_jax.eval import model_eval  # noqa: PLC0415 (loads the sampler)

        t0 = time.perf_counter()
        result = model_eval.evaluate_run(workdir, num=ev.num, steps=ev.steps, cfg=ev.cfg, edits=ev.edits)
        print(model_eval.format_result(result))
        summary["eval"] = result
        summary["eval_seconds"] = time.perf_counter() - t0
    return summary


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """`jax.distributed.initialize` when a coordinator is given (or a cluster is detected).

    On a TPU pod slice or a SLURM/Kubernetes GPU cluster JAX finds the coordinator itself; on a
    CPU the processes use the gloo collectives.
    """
    if coordinator is None and num_processes is None:
        return
    # Unconditionally, and without asking for the backend (jax.devices() / default_backend() would
    # start it, and initialize() must come first); the setting only affects the CPU client.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
