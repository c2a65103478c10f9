"""The run directory: its config, one Orbax checkpoint manager per stage, and loading a run.

A run lives in one work directory::

    <workdir>/
      config.json                 the full config it ran with (ConfigDict.to_json), incl. the VAE
                                  latent scale/shift once measured; written atomically
      checkpoints/<stage>/<step>/ one Orbax CheckpointManager per stage ("vae", "flow", "flow_hr",
        state/                    "edit", "distill", "consistency"); each step holds the train state ("state", a
        data/                     StandardSave pytree) and, when given, the Grain iterator state
                                  ("data": process_<i>-of-<n>.json, one file per process)
      metrics.jsonl, TensorBoard events, samples/   (written by the trainer, not here)

The train state of every stage is a dict with at least these keys::

    {"step": int32 scalar, "params": ..., "ema_params": ..., "opt_state": ...}

`ema_params` is what inference uses, and its layout is the contract `load_run` relies on:

  - stage "vae": `ema_params` is the VAE's parameter tree itself (what `VAE.apply` takes as
    `{"params": ...}`).
  - stages "flow", "flow_hr", "edit", "distill", "consistency" (DENOISER_STAGES): `ema_params` is a dict
    of named model trees, e.g. `{"denoiser": ..., "text": ...}` (the flow stage may train a
    SimpleTextEncoder jointly; a stage that trains only the denoiser saves `{"denoiser": ...}`).

`load_run(workdir) -> (config, params)` returns `params = {"vae": ..., "denoiser": ..., "text": ...}`
(a key is absent when no stage saved it): "vae" from the "vae" stage; the named trees of the
denoising stages merged in the order flow -> flow_hr -> edit -> distill -> consistency, so the latest stage in
the curriculum that saved a name wins ("edit" overrides "flow"'s "denoiser", a consistency-distilled
"denoiser" overrides them all; "text" stays "flow"'s if no later stage trains it). Only
`ema_params` is read (a partial restore: the optimizer state is never loaded), onto one local
device whatever mesh the checkpoint was written on.

Nothing here pickles: Orbax for arrays, JSON for the config and the iterator state.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# The order is also the trainer's rng stream per stage (`fold_in(seed, index)`): append, never reorder.
# The curriculum's order: each stage starts from the one before it (the flow stage needs the VAE;
# the high-resolution flow starts from the flow weights; editing from the latest text-to-image
# weights; the distillations from everything before), and `load_run` merges in this order.
STAGES: tuple[str, ...] = ("vae", "flow", "flow_hr", "edit", "distill", "consistency")
# A named parameter tree that only training uses (the attribute-alignment probe): in checkpoints,
# never in what `load_run` returns, so sampling and export see the model alone.
ATTRIBUTE_HEAD = "attribute_head"
# Stages whose `ema_params` is a dict of named model trees, merged into `params` in this order
# (the latest distilled weights win); also where `init_from` looks for a denoiser.
DENOISER_STAGES: tuple[str, ...] = ("flow", "flow_hr", "edit", "distill", "consistency")
STATE_ITEM = "state"
DATA_ITEM = "data"
# Model keys measured by training and written back into config.json: a resumed run's requested
# config still holds the defaults, so these may differ without meaning "another model".
MEASURED_KEYS: frozenset[str] = frozenset({"model.vae.scaling_factor", "model.vae.shift_factor"})
# Model keys added after runs were saved without them, with the value those runs had.
ADDED_KEYS: dict[str, Any] = {
    "model.backbone.patch_size": 1,
    "model.backbone.source_positions": "grid",
    "model.backbone.source_skip": False,
    "model.backbone.cross_gate_init": 0.0,
    "model.backbone.shared_gate_init": 0.0,
}


class RunError(ValueError):
    """A work directory that cannot be used; the message is one line naming the path."""


# ----------------------------------------------------------------------------- run config


def _tuples(value: Any) -> Any:
    """JSON has no tuples: turn lists back into the tuples the config files declare."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def save_run_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> Path:
    """Writes `workdir/config.json` atomically (temp file + rename): a crash never leaves half a file.

    Only process 0 writes (every process of a multi-host run calls this with the same config).

    Args:
      workdir: the run directory (created if missing).
      config: the full config the run uses.

    Returns:
      The path of config.json.
    """
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    if jax.process_index() != 0:
        return path
    text = config.to_json(indent=2, sort_keys=False)
    if path.is_file() and path.read_text() == text + "\n":
        return path  # unchanged (a resumed run): leave the file, and its mtime, alone
    workdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json.tmp", dir=workdir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads `workdir/config.json` (lists become tuples, as declared in configs/).

    Args:
      workdir: the run directory.

    Returns:
      The run's config, locked (no new keys).

    Raises:
      RunError: the directory or its config.json is missing or not valid JSON.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise RunError(f"run directory {workdir} does not exist")
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{workdir} is not a run directory: it has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is not a readable JSON config: {e}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a config (a JSON object)")
    config = ml_collections.ConfigDict(_tuples(data))
    config.lock()
    return config


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping | ml_collections.ConfigDict):
        out: dict[str, Any] = {}
        for k in value.keys():
            out.update(_flatten(value[k], f"{prefix}.{k}"))
        return out
    return {prefix: _tuples(value)}


def check_compatible(
    saved: ml_collections.ConfigDict,
    requested: ml_collections.ConfigDict,
    *,
    section: str = "model",
    where: str = "the saved run",
) -> None:
    """Refuses to resume a run whose model section differs from the requested config.

    Training keys (steps, learning rates, batch size, ...) may differ; so may the measured
    MEASURED_KEYS (the VAE latent scale/shift), where the saved value is the one to use.

    Args:
      saved: the config of the run on disk (`read_run_config`).
      requested: the config asked for now.
      section: the top-level section that must agree.
      where: how to name the saved run in the message (e.g. its path).

    Raises:
      RunError: naming the first differing key, "checkpoint from another config: ...".
    """
    missing = object()
    a = _flatten(saved.get(section, {}), section)
    b = _flatten(requested.get(section, {}), section)
    for key in list(b) + [k for k in a if k not in b]:
        if key in MEASURED_KEYS:
            continue
        old, new = a.get(key, ADDED_KEYS.get(key, missing)), b.get(key, missing)
        if old != new:
            show = lambda v: "absent" if v is missing else repr(v)
            raise RunError(
                f"checkpoint from another config: {key} is {show(old)} in {where} but {show(new)} in the requested "
                f"config (use a new --workdir, or the run's own config)"
            )


# ----------------------------------------------------------------------------- one stage's checkpoints


class StageCheckpointer:
    """One Orbax CheckpointManager for `workdir/checkpoints/<stage>`: train state + Grain iterator.

    Saving is asynchronous (the arrays are copied to host, then written in the background); call
    `wait_until_finished()` before exiting, and on SIGTERM (see `install_sigterm_handler`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        stage: str,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        """Opens (creating if needed) the checkpoints of one stage.

        Args:
          workdir: the run directory.
          stage: one of STAGES.
          max_to_keep: how many recent checkpoints survive (None keeps all).
          save_interval_steps: `save` writes only on multiples of this (unless forced).
          async_save: write in a background thread.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        self.stage = stage
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR / stage
        self.stop_requested = threading.Event()  # set by the SIGTERM handler
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITEM: grain.checkpoint.CheckpointHandler(),
            },
        )

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Saves the train state (and the data iterator's position) at `step`, if it is due.

        The iterator state is captured synchronously, inside this call, so the iterator may be
        advanced as soon as it returns.

        Args:
          step: the training step the state is at (the number of updates applied).
          state: a pytree of jax Arrays (sharded or not) and scalars.
          data_iterator: a Grain `DatasetIterator`/`DataLoaderIterator`, or None.
          force: save even if `step` is not a multiple of `save_interval_steps`.

        Returns:
          Whether a checkpoint was started (False when not due, or `step` is already saved).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False  # e.g. a forced final save right after resuming at this step
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    def latest_step(self) -> int | None:
        """The last saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, in increasing order."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restores the train state at `step` (None: the latest), and the iterator in place.

        Args:
          step: the step to restore, or None for the latest.
          abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with `sharding=` set to the
            shardings training will use (`jax.eval_shape` + the config's shardings): the arrays
            come back laid out that way, whatever mesh wrote them.
          data_iterator: the freshly built Grain iterator of the same pipeline, or None; its state
            is set so that its next batch is the one the interrupted run would have seen.

        Returns:
          The restored state (same structure as `abstract_state`).

        Raises:
          RunError: no checkpoint, a missing iterator state, or a checkpoint that cannot be read.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise RunError(f"no checkpoint to restore in {self.directory}")
        step_dir = self.directory / str(step)
        if not (step_dir / STATE_ITEM).is_dir():
            raise RunError(f"checkpoint {step_dir} has no train state ({STATE_ITEM}/)")
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (step_dir / DATA_ITEM).is_dir():
                raise RunError(f"checkpoint {step_dir} has no data iterator state ({DATA_ITEM}/) to resume from")
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types (a bare Exception too) for a damaged checkpoint
            earlier = [s for s in self.all_steps() if s < step]
            hint = f"; move it away to resume from step {earlier[-1]}" if earlier else ""
            raise RunError(f"cannot restore checkpoint {step_dir} ({_one_line(e)}){hint}") from e
        return restored[STATE_ITEM]

    def wait_until_finished(self) -> None:
        """Blocks until every started save is written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> StageCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def install_sigterm_handler(checkpointer: StageCheckpointer) -> threading.Event:
    """Makes SIGTERM (preemption, `kill`, a scheduler's time limit) end the run cleanly.

    The first SIGTERM only sets `checkpointer.stop_requested` (also returned): the loop checks it
    once per step and, when set, saves at its current step with `force=True`, calls
    `wait_until_finished()` and returns. A second SIGTERM (the loop did not get there in time)
    waits for the saves already in flight, then ends the process the default way, so no
    half-written checkpoint is left behind. Call from the main thread; a no-op elsewhere.

    Multi-host: a preemption notice may reach one host only, and a save is collective, so the
    loop does not read the event directly but `agree_to_stop(event.is_set(), step, every)`: every
    `every` steps (and at the end of a stage) the processes OR their flags, so all of them stop
    at the same step and save it together.

    Args:
      checkpointer: the stage's checkpointer.

    Returns:
      The event the loop polls.
    """
    event = checkpointer.stop_requested
    if threading.current_thread() is not threading.main_thread():
        return event

    def handler(signum: int, frame: Any) -> None:
        if not event.is_set():
            event.set()
            return
        checkpointer.wait_until_finished()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    return event


# Multi-host: steps between two agreements on a SIGTERM (`agree_to_stop`); the config key
# `stop_check_every` overrides it. One check is a 4-byte all-gather (1.7 ms measured on a busy
# 2-core CPU, 2 processes, gloo: 0.15 ms a step at every 10, against 270 ms for a nano VAE step)
# plus a wait for the step in flight (the host loses its one step of lead once per check).
STOP_CHECK_EVERY = 10


def agree_to_stop(local: bool, step: int | None = None, every: int = STOP_CHECK_EVERY) -> bool:
    """Whether to stop now: the same answer on every process.

    One process: `local` itself (so a single host stops at the very step it was signalled).
    Several processes: at steps that are multiples of `every`, or when `step` is None (e.g. the
    last step of a stage), the processes' flags are OR-ed through a tiny all-gather — a
    collective, so every process must make the same calls in the same order; at other steps,
    False (a SIGTERM waits for the next check, at most `every` steps).

    Args:
      local: whether this process was asked to stop (its SIGTERM event).
      step: the step just dispatched, or None to check unconditionally.
      every: steps between checks.

    Returns:
      True on every process, or on none.
    """
    if jax.process_count() == 1:
        return bool(local)
    if step is not None and step % max(1, every):
        return False
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.any(multihost_utils.process_allgather(np.asarray([local], np.int32))))


# ----------------------------------------------------------------------------- loading a run


def _one_line(e: BaseException) -> str:
    if type(e) is Exception and e.__cause__ is not None:  # Orbax wraps TensorStore's error in a bare Exception
        e = e.__cause__
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:200] + ' ...' if len(first) > 200 else first}"


def _read_manager(directory: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_root_metadata=False, save_interval_steps=0
    )
    # The data item's handler is registered though it is never read here: without it Orbax logs a
    # warning ("Item 'data' was found in the checkpoint, but could not be restored") on every load.
    handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(), DATA_ITEM: grain.checkpoint.CheckpointHandler()}
    # Reading is the point of a read-only manager: silence its "Given directory is read only" warning.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    finally:
        absl_logger.setLevel(level)


def latest_steps(workdir: str | os.PathLike) -> dict[str, int]:
    """The latest finished step of every stage with a checkpoint, e.g. {"vae": 500, "flow": 2000}.

    Reads directory names only (temporary, unfinished saves are not counted); writes nothing.
    """
    root = Path(workdir) / CHECKPOINT_DIR
    steps = {}
    for stage in STAGES:
        directory = root / stage
        if directory.is_dir():
            try:
                found = [int(s) for s in ocp.utils.checkpoint_steps(directory)]
            except (OSError, ValueError) as e:  # a stray entry that is not a step directory
                raise RunError(f"cannot list the checkpoints in {directory} ({_one_line(e)})") from e
            if found:
                steps[stage] = max(found)
    return steps


def _restore_items(directory: Path, step: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """Restores only `keys` of one checkpoint's train state, as arrays on the first local device."""
    directory = Path(directory).absolute()  # Orbax refuses relative paths (`--workdir runs/nano`)
    step_dir = directory / str(step)
    if not (step_dir / STATE_ITEM).is_dir():
        raise RunError(f"checkpoint {step_dir} is incomplete: it has no {STATE_ITEM}/")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    manager = _read_manager(directory)
    try:
        tree = manager.item_metadata(step)[STATE_ITEM]
        tree = getattr(tree, "tree", tree)
        missing = [k for k in keys if not isinstance(tree, Mapping) or k not in tree]
        if missing:
            raise RunError(f"checkpoint {step_dir} has no {', '.join(missing)} in its train state")
        target = {
            k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree[k]) for k in keys
        }
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))
    except RunError:
        raise
    except Exception as e:  # Orbax/TensorStore raise many types for a damaged checkpoint
        raise RunError(f"checkpoint {step_dir} cannot be read ({_one_line(e)})") from e
    finally:
        manager.close()
    return {k: restored[STATE_ITEM][k] for k in keys}


def _restore_ema(directory: Path, step: int) -> Any:
    return _restore_items(directory, step, ("ema_params",))["ema_params"]


def restore_stage_params(
    workdir: str | os.PathLike, stage: str, keys: tuple[str, ...] = ("params", "ema_params")
) -> dict[str, Any]:
    """`keys` of a stage's latest train state on one device (e.g. the flow model the edit stage
    starts from), without reading the optimizer state."""
    step = latest_steps(workdir).get(stage)
    if step is None:
        raise RunError(f"run {workdir} has no checkpoint of stage {stage!r}")
    return _restore_items(Path(workdir) / CHECKPOINT_DIR / stage, step, keys)


def load_run(workdir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Loads a run for inference: its config and the EMA parameters of each stage's latest checkpoint.

    The one loader the sampler, the evaluator and the exporter use. Reads only; never writes,
    moves or deletes anything in `workdir`, also when it fails.

    Args:
      workdir: the run directory.

    Returns:
      (config, params): the run's config.json, and `{"vae": ..., "denoiser": ..., "text": ...}`
      (keys present for the stages that were trained; see the module docstring for which stage
      provides which), every leaf a jax Array on the first local device.

    Raises:
      RunError: a missing directory, no config.json, no checkpoints, or a damaged checkpoint;
        one line naming the path.
    """
    workdir = Path(workdir)
    config = read_run_config(workdir)
    steps = latest_steps(workdir)
    if not steps:
        raise RunError(f"run {workdir} has a config but no checkpoints (nothing under {workdir / CHECKPOINT_DIR})")
    params: dict[str, Any] = {}
    root = workdir / CHECKPOINT_DIR
    if "vae" in steps:
        params["vae"] = _restore_ema(root / "vae", steps["vae"])
    elif config.model.vae.get("kind", "dc") == "pixel":  # pixel space: the "VAE" has no parameters
        params["vae"] = {}
    for stage in DENOISER_STAGES:
        if stage in steps:
            named = _restore_ema(root / stage, steps[stage])
            if not isinstance(named, Mapping):
                raise RunError(
                    f"checkpoint {root / stage / str(steps[stage])}: ema_params is not a dict of named models"
                )
            params.update({k: v for k, v in named.items() if k != ATTRIBUTE_HEAD})
    return config, params
