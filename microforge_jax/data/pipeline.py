"""Grain input pipelines: shuffle per epoch, shard by process, batch, scale images to [-1, 1].

The order of operations, all on index-addressable `grain.MapDataset`s, so the only iterator state
is "the next batch index" and resuming is exact::

    source(s) -> shuffle(seed) -> mix (several sources) -> this process's slice -> repeat(num_epochs)
      -> transform (per record) -> batch(per-process size, drop remainder) -> uint8 -> float32 [-1, 1]
      -> to_iter_dataset (threads prefetch a few batches) [-> mp_prefetch(worker_count)]

`iter(dataset)` is a `grain.DatasetIterator` with `get_state()/set_state()` (JSON-able dicts) that
`StageCheckpointer.save/restore(..., data_iterator=it)` checkpoints.

Sharding by process: every process builds the same shuffled epoch and takes every
`process_count`-th element starting at `process_index`, after truncating the epoch to a multiple
of `process_count` (so all processes see the same number of batches and never wait on each other
at an epoch's end). Each process reads a disjoint part of every epoch.

Batches are dicts of numpy arrays with a leading batch dimension. String fields (`text`) come out
of Grain's default batching (`np.stack`) as numpy unicode arrays (dtype `<U<n>`, items are
`np.str_`, a `str` subclass): tokenize them on the host before `sharding.shard_batch`, which only
takes numeric arrays.

Stage batches from the built-in shapes world (`shapes_dataset`):
  vae:  image f32 BxHxWx3
  flow: image f32 BxHxWx3, text <U BxN, cells f32 Bx9 (1 = a 3x3-grid cell whose object the
        caption places; for `train.flow.object_cell_weight`), attrs int32 Bx9x2 (per cell 1 + shape,
        1 + colour index, 0 = empty; for `train.flow.attribute_weight`)
  edit: image (target) f32 BxHxWx3, source f32 BxHxWx3, mask f32 BxHxWx1 (1 = region to change;
        all ones for sr, whose whole image is regenerated), text <U (the instruction or caption),
        caption <U (of the target image), task int32 B (index into `shapes.TASKS`: 1 edit,
        2 inpaint, 3 sr). The three source-conditioned tasks interleave in equal proportions (the
        backbone runs Generate without a source half, so "generate" records are not mixed in
        here; `train.edit.generate_weight` trains generation on the targets and captions instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from microforge_jax.data.shapes import NUM_OBJECTS_P, TASKS, ShapesSource

Record = dict[str, Any]

# Which shapes tasks feed each training stage.
STAGE_TASKS: dict[str, tuple[str, ...]] = {
    "vae": ("generate",),
    "flow": ("generate",),
    "edit": ("edit", "inpaint", "sr"),
}


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """The batch each process reads: the global batch split evenly over processes.

    Raises:
      ValueError: the global batch does not split evenly.
    """
    if global_batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch_size {global_batch_size} does not split over {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return global_batch_size // process_count


def _derived_seed(seed: int, *keys: int) -> int:
    """Independent shuffle seeds for the sources of a mixture (a Grain shuffle takes 32 bits)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _to_unit_range(batch: Record) -> Record:
    """uint8 images in [0, 255] -> float32 in [-1, 1]; other fields unchanged."""
    return {
        k: (np.asarray(v, np.float32) * np.float32(1 / 127.5) - 1.0 if getattr(v, "dtype", None) == np.uint8 else v)
        for k, v in batch.items()
    }


def make_dataset(
    source: Any | Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    transform: Callable[[Record], Record] | None = None,
    weights: Sequence[float] | None = None,
    read_threads: int = 2,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """A checkpointable Grain pipeline over one random-access source, or a mixture of several.

    Args:
      source: a Grain random-access source (`__len__`, `__getitem__` returning dict records), or
        a sequence of them to interleave (each shuffled with its own seed, then mixed by `weights`).
      batch_size: the GLOBAL batch size; each process reads `batch_size / process_count`.
      seed: the shuffle seed; each epoch is reshuffled (deterministically) from it.
      shuffle: shuffle the records (False: index order, e.g. for evaluation).
      num_epochs: passes over the data; None repeats forever.
      process_index: this process (default `jax.process_index()`).
      process_count: the number of processes (default `jax.process_count()`).
      worker_count: Grain worker processes (0: read in this process; tests use 0).
      transform: a per-record function (record dict -> dict of numpy arrays / str) run before
        batching, e.g. `stage_transform("edit")`; every record must come out with the same keys
        and shapes.
      weights: mixing proportions for a sequence of sources (default equal).
      read_threads: threads computing batches ahead of the consumer (0: on demand).
      prefetch_batches: how many batches those threads keep ready.

    Returns:
      A `grain.IterDataset`; `iter()` of it yields dicts of numpy arrays (leading dim the
      per-process batch), uint8 fields converted to float32 in [-1, 1].

    Raises:
      ValueError: a batch size that does not split over the processes, a bad process index, or
        an epoch shorter than one batch per process.
    """
    if process_index is None or process_count is None:
        import jax  # (grain imports jax anyway; here only for these defaults)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    local_batch = per_process_batch_size(batch_size, process_count)

    sources = list(source) if isinstance(source, list | tuple) else [source]
    parts = []
    for i, src in enumerate(sources):
        ds = grain.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=_derived_seed(seed, i) if len(sources) > 1 else seed)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=weights)

    # This process's part of every epoch: the epoch truncated to a multiple of process_count
    # (equal step counts everywhere), then a strided slice. Slicing after the shuffle and before
    # the repeat keeps the parts disjoint in every (differently shuffled) epoch.
    per_process = len(ds) // process_count
    if per_process < local_batch:
        raise ValueError(
            f"an epoch of {len(ds)} records gives {per_process} per process, fewer than one batch of {local_batch}"
        )
    ds = ds[process_index : per_process * process_count : process_count]
    ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(local_batch, drop_remainder=True).map(_to_unit_range)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches if read_threads else 0)
    )
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds


# ----------------------------------------------------------------------------- stage records


def _vae_record(rec: Record) -> Record:
    return {"image": rec["image"]}


def _flow_record(rec: Record) -> Record:
    out = {"image": rec["image"], "text": rec["text"], "cells": rec["cells"]}
    if "attrs" in rec:  # the shapes world's per-cell labels (attribute alignment)
        out["attrs"] = rec["attrs"]
    return out


def _edit_record(rec: Record) -> Record:
    if "source" not in rec:
        raise ValueError(f"the edit stage needs source-conditioned records; got task {TASKS[int(rec['task'])]!r}")
    image = rec["image"]
    if "mask" in rec:
        mask = rec["mask"]
    else:  # sr changes every pixel
        mask = np.ones((*image.shape[:2], 1), np.float32)
    return {
        "image": image,
        "source": rec["source"],
        "mask": mask.astype(np.float32),
        "text": rec["text"],
        "caption": rec.get("caption", rec["text"]),  # of the target (inpaint / sr: the text is the caption)
        "task": np.int32(rec["task"]),
    }


_STAGE_TRANSFORMS: dict[str, Callable[[Record], Record]] = {
    "vae": _vae_record,
    "flow": _flow_record,
    "edit": _edit_record,
}


def stage_transform(stage: str) -> Callable[[Record], Record]:
    """The per-record conversion of a shapes record into a stage's training fields.

    Args:
      stage: "vae", "flow" or "edit" (field lists in the module docstring).

    Returns:
      A function record -> record with the stage's fields only (images still uint8).
    """
    if stage not in _STAGE_TRANSFORMS:
        raise ValueError(f"no input pipeline for stage {stage!r}; expected one of {', '.join(_STAGE_TRANSFORMS)}")
    return _STAGE_TRANSFORMS[stage]


def shapes_dataset(
    stage: str,
    *,
    batch_size: int,
    seed: int,
    image_size: int = 64,
    split: str = "train",
    num_records: int = 1 << 20,
    data_seed: int = 0,
    weights: Sequence[float] | None = None,
    objects_p: Sequence[float] = NUM_OBJECTS_P,
    **kwargs: Any,
) -> grain.IterDataset:
    """Training batches of one stage from the built-in shapes world.

    Args:
      stage: "vae", "flow" or "edit".
      batch_size: the global batch size.
      seed: the shuffle seed.
      image_size: resolution of the rendered images.
      split: "train", "val" or "heldout".
      num_records: records per task (one epoch of each source).
      data_seed: the world's seed (which scenes exist), independent of the shuffle seed.
      weights: mixing proportions of the stage's tasks (`STAGE_TASKS[stage]` order).
      objects_p: probabilities of scenes with 1, 2, 3 objects (`shapes.NUM_OBJECTS_P` by default;
        the edit task keeps the world's mix).
      **kwargs: passed to `make_dataset` (num_epochs, process_index/count, worker_count, ...).

    Returns:
      The stage's `grain.IterDataset` (fields in the module docstring).
    """
    transform = stage_transform(stage)
    sources = [
        ShapesSource(task, split, image_size, num_records, data_seed, objects_p=tuple(objects_p))
        for task in STAGE_TASKS[stage]
    ]
    return make_dataset(
        sources if len(sources) > 1 else sources[0],
        batch_size=batch_size,
        seed=seed,
        transform=transform,
        weights=weights,
        **kwargs,
    )
