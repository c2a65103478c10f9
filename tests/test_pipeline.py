"""Grain pipelines: determinism, process sharding, exact resume, batch sizes, dtypes, stage batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from microforge_jax.checkpoint import StageCheckpointer
from microforge_jax.data.pipeline import make_dataset, per_process_batch_size, shapes_dataset, stage_transform
from microforge_jax.data.shapes import TASKS, ShapesSource

SIZE = 16  # tiny images: the tests are about order and state, not pixels


def _source(task="generate", n=48):
    return ShapesSource(task, "train", SIZE, num_records=n)


def _take(ds_or_it, k):
    it = iter(ds_or_it)
    return [next(it) for _ in range(k)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_deterministic_for_a_seed_and_reshuffled_per_epoch():
    kw = dict(batch_size=8, process_index=0, process_count=1, read_threads=0)
    first = _take(make_dataset(_source(), seed=3, **kw), 12)  # two epochs of 48
    again = _take(make_dataset(_source(), seed=3, **{**kw, "read_threads": 2}), 12)  # threads: same order
    other = _take(make_dataset(_source(), seed=4, **kw), 6)
    for a, b in zip(first, again):
        _assert_same(a, b)
    idx = lambda batches: np.concatenate([b["index"] for b in batches])
    epoch0, epoch1 = idx(first[:6]), idx(first[6:])
    assert sorted(epoch0) == list(range(48)) and sorted(epoch1) == list(range(48))
    assert not np.array_equal(epoch0, epoch1)  # each epoch shuffled differently
    assert not np.array_equal(epoch0, idx(other))
    unshuffled = _take(make_dataset(_source(), seed=3, shuffle=False, **kw), 1)[0]
    np.testing.assert_array_equal(unshuffled["index"], np.arange(8))


def test_two_processes_read_disjoint_halves():
    # 50 records over 2 processes: the epoch is truncated to 50, 25 each, 6 batches of 4 each
    # (the remainder of each process's part is dropped, since batches span epochs).
    seen = []
    for p in range(2):
        ds = make_dataset(
            _source(n=50), batch_size=8, seed=0, num_epochs=1, process_index=p, process_count=2, read_threads=0
        )
        batches = list(ds)
        assert len(batches) == 6 and all(b["image"].shape[0] == 4 for b in batches)
        seen.append(np.concatenate([b["index"] for b in batches]))
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 48

    # Whole batches over a full epoch cover it exactly: 48 records, 2 x 6 batches of 4.
    kw = dict(batch_size=8, seed=1, num_epochs=1, process_count=2, read_threads=0)
    parts = [np.concatenate([b["index"] for b in make_dataset(_source(), process_index=p, **kw)]) for p in range(2)]
    assert sorted(np.concatenate(parts)) == list(range(48))


def test_batch_size_errors():
    assert per_process_batch_size(32, 4) == 8
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        make_dataset(_source(), batch_size=8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        make_dataset(_source(), batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_dataset(_source(n=6), batch_size=8, seed=0, process_index=0, process_count=1)


def test_exact_resume_through_get_set_state():
    make = lambda: iter(make_dataset(_source(), batch_size=8, seed=5, process_index=0, process_count=1))
    reference = _take(make(), 9)  # crosses the epoch boundary after 6
    it = make()
    _take(it, 4)
    state = it.get_state()
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(_take(resumed, 5), reference[4:]):
        _assert_same(a, b)


def test_exact_resume_through_the_checkpointer(tmp_path):
    make = lambda: iter(shapes_dataset("flow", batch_size=4, seed=2, image_size=SIZE, num_records=40))
    reference = _take(make(), 6)
    it = make()
    _take(it, 3)
    with StageCheckpointer(tmp_path, "flow") as ckpt:
        ckpt.save(3, {"step": jnp.int32(3)}, data_iterator=it)
        _take(it, 2)  # the loop goes on after the (async) save started: must not leak into it
    fresh = make()
    with StageCheckpointer(tmp_path, "flow") as ckpt:
        state = ckpt.restore(None, {"step": jnp.zeros((), jnp.int32)}, data_iterator=fresh)
    assert int(state["step"]) == 3
    for a, b in zip(_take(fresh, 3), reference[3:]):
        _assert_same(a, b)


def test_stage_batches_dtypes_and_fields():
    vae = _take(shapes_dataset("vae", batch_size=4, seed=0, image_size=SIZE, num_records=16, read_threads=0), 1)[0]
    assert set(vae) == {"image"}
    assert vae["image"].dtype == np.float32 and vae["image"].shape == (4, SIZE, SIZE, 3)
    assert -1.0 <= vae["image"].min() < vae["image"].max() <= 1.0

    flow = _take(shapes_dataset("flow", batch_size=4, seed=0, image_size=SIZE, num_records=16, read_threads=0), 1)[0]
    assert set(flow) == {"image", "text", "cells", "attrs"} and flow["text"].shape == (4,)
    assert flow["cells"].dtype == np.float32 and flow["cells"].shape == (4, 9)
    assert flow["attrs"].dtype == np.int32 and flow["attrs"].shape == (4, 9, 2)
    assert ((flow["attrs"] > 0).sum(1) > 0).all()  # every scene has an object's labels
    assert flow["text"].dtype.kind == "U" and all(isinstance(t, str) and t for t in flow["text"])

    it = iter(shapes_dataset("edit", batch_size=6, seed=0, image_size=SIZE, num_records=16, read_threads=0))
    batches = _take(it, 2)
    for b in batches:
        assert set(b) == {"image", "source", "mask", "text", "caption", "task"}
        assert b["image"].shape == b["source"].shape == (6, SIZE, SIZE, 3) and b["source"].dtype == np.float32
        assert b["mask"].shape == (6, SIZE, SIZE, 1) and b["mask"].dtype == np.float32
        assert b["task"].dtype == np.int32 and all(isinstance(t, str) and t for t in b["text"])
        for task, text, caption in zip(b["task"], b["text"], b["caption"]):  # the target's caption
            assert (caption == text) == (task != TASKS.index("edit")), (task, text, caption)
    tasks = np.concatenate([b["task"] for b in batches])
    assert sorted(set(tasks.tolist())) == [TASKS.index(t) for t in ("edit", "inpaint", "sr")]
    assert np.bincount(tasks, minlength=4)[1:].tolist() == [4, 4, 4]  # equal mix
    sr = np.concatenate([b["mask"] for b in batches])[tasks == TASKS.index("sr")]
    assert np.all(sr == 1.0)


def test_edit_mixture_resumes_exactly_and_splits_by_process():
    kw = dict(batch_size=6, seed=1, image_size=SIZE, num_records=12, read_threads=0)
    make = lambda p: iter(shapes_dataset("edit", process_index=p, process_count=2, **kw))
    reference = _take(make(0), 5)
    it = make(0)
    _take(it, 2)
    state = it.get_state()
    resumed = make(0)
    resumed.set_state(state)
    for a, b in zip(_take(resumed, 3), reference[2:]):
        _assert_same(a, b)
    # One epoch of the mixture (3 x 12 records) split between two processes: disjoint, covering.
    keep = lambda r: {"task": r["task"], "index": r["index"]}
    sources = [_source(t, 12) for t in ("edit", "inpaint", "sr")]
    keys = []
    for p in range(2):
        ds = make_dataset(sources, batch_size=6, seed=1, num_epochs=1, process_index=p, process_count=2, transform=keep)
        keys.append({(int(t), int(i)) for b in ds for t, i in zip(b["task"], b["index"])})
    assert len(keys[0]) == len(keys[1]) == 18 and not keys[0] & keys[1]
    assert keys[0] | keys[1] == {(TASKS.index(t), i) for t in ("edit", "inpaint", "sr") for i in range(12)}


def test_stage_transform_rejects_unknown_stage():
    with pytest.raises(ValueError, match="no input pipeline for stage"):
        stage_transform("distill")


def test_flow_objects_p_reaches_the_rendered_training_images():
    from microforge_jax.eval.shapes_eval import detect_objects

    kw = dict(batch_size=8, seed=0, image_size=64, num_records=64, read_threads=0)
    batch = _take(shapes_dataset("flow", objects_p=(0.0, 0.0, 1.0), **kw), 1)[0]
    images = np.rint((batch["image"] + 1.0) * 127.5).astype(np.uint8)
    assert [len(detect_objects(im)) for im in images] == [3] * 8  # read back from the pixels
    default = _take(shapes_dataset("flow", **kw), 1)[0]
    assert len({len(detect_objects(np.rint((im + 1.0) * 127.5).astype(np.uint8))) for im in default["image"]}) > 1
