"""Tests for the procedural shapes world: determinism, coverage, splits, task records, Grain."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from microforge_jax.data import shapes as S
from microforge_jax.data.shapes_render import (
    BACKGROUND_KINDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    cells_mask,
    object_mask,
    render_scene,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("task", S.TASKS)
def test_records_deterministic_and_distinct(task):
    a, b, c = S.make_record(task, 7), S.make_record(task, 7), S.make_record(task, 8)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].tobytes() == b[k].tobytes(), k
        else:
            assert a[k] == b[k], k
    assert a["image"].tobytes() != c["image"].tobytes()
    # another split or seed is another stream
    assert S.make_record(task, 7, seed=1)["image"].tobytes() != a["image"].tobytes()
    assert S.make_record(task, 7, split="val")["scene"] != a["scene"]


def test_scene_json_round_trip_renders_same_bytes():
    for i in range(20):
        rec = S.make_record("generate", i, image_size=48)
        scene = S.scene_from_json(rec["scene"])
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert render_scene(scene, 48).tobytes() == rec["image"].tobytes()


def test_scene_validation():
    good = Scene((Obj("circle", "red", "small", 0),)).to_dict()
    Scene.from_dict(good)
    for field, bad in [("colour", "mauve"), ("shape", "blob"), ("size", "huge"), ("cell", 9)]:
        d = json.loads(json.dumps(good))
        d["objects"][0][field] = bad
        with pytest.raises(ValueError):
            Scene.from_dict(d)
    d = json.loads(json.dumps(good))
    d["objects"].append(dict(d["objects"][0]))  # same cell twice
    with pytest.raises(ValueError):
        Scene.from_dict(d)


def test_every_attribute_value_appears():
    scenes = [S.scene_for_index(i) for i in range(2000)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.size for o in objs} == set(SIZES)
    assert {o.cell for o in objs} == set(range(len(POSITIONS)))
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background.kind for s in scenes} == set(BACKGROUND_KINDS)
    assert len(COLOURS) >= 8 and len(SHAPES) >= 8


def test_heldout_pairs_never_in_train():
    for i in range(5000):
        for o in S.scene_for_index(i, "train").objects:
            assert (o.colour, o.shape) not in S.HELDOUT_PAIRS
    for i in range(2000):  # edits must not create one either (recolour, add)
        src, tgt, *_ = S.sample_edit(np.random.default_rng([0, 0, 1, i]), "train")
        for o in src.objects + tgt.objects:
            assert (o.colour, o.shape) not in S.HELDOUT_PAIRS
    for i in range(500):
        for o in S.scene_for_index(i, "val").objects:
            assert (o.colour, o.shape) not in S.HELDOUT_PAIRS
    heldout = [S.scene_for_index(i, "heldout") for i in range(500)]
    assert all((s.objects[0].colour, s.objects[0].shape) in S.HELDOUT_PAIRS for s in heldout)
    assert {(s.objects[0].colour, s.objects[0].shape) for s in heldout} == set(S.HELDOUT_PAIRS)


def test_objects_never_overlap_and_stay_in_their_cell():
    for size in (64, 99):
        for i in range(150):
            scene = S.scene_for_index(i)
            masks = [object_mask(o, size) > 0 for o in scene.objects]
            assert sum(m.astype(int) for m in masks).max() <= 1
            for o, m in zip(scene.objects, masks, strict=True):
                assert m.any() and not (m & ~cells_mask([o.cell], size, margin=0)).any()


def test_render_any_resolution_and_speed():
    for size in (32, 64, 256):
        img = render_scene(S.scene_for_index(3), size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    scenes = [S.scene_for_index(i) for i in range(1000)]
    t = time.perf_counter()
    for s in scenes:
        render_scene(s, 64)
    assert time.perf_counter() - t < 30.0  # generous sanity bound; measured ~0.3 s on 2 cores


def test_captions():
    scene = Scene((Obj("circle", "red", "large", 0), Obj("square", "blue", "small", 7)))
    assert S.caption_for(scene, 0) == "a large red circle in the top left and a small blue square at the bottom"
    assert S.caption_for(scene, 1).startswith("two shapes: ")
    assert S.caption_for(scene, 3) == "red circle, blue square"
    for t in range(S.NUM_TEMPLATES):
        cap = S.caption_for(scene, t)
        assert all(w in cap for w in ("red", "circle", "blue", "square"))
        if t in S.COMPLETE_TEMPLATES:
            assert all(w in cap for w in ("large", "small", "top left", "bottom"))
    with pytest.raises(ValueError):
        S.caption_for(scene, S.NUM_TEMPLATES)
    texts = {S.make_record("generate", i)["text"] for i in range(200)}
    assert len(texts) > 150
    assert any(t.startswith(("one shape", "two shapes", "three shapes")) for t in texts)
    assert "a orange" not in " ".join(texts)


def test_edit_records():
    ops = set()
    for i in range(120):
        r = S.make_record("edit", i)
        ops.add(r["op"])
        assert r["image"].shape == r["source"].shape == (64, 64, 3) and r["image"].dtype == np.uint8
        assert r["mask"].shape == (64, 64, 1) and r["mask"].dtype == np.float32
        src, tgt = S.scene_from_json(r["source_scene"]), S.scene_from_json(r["scene"])
        assert render_scene(tgt, 64).tobytes() == r["image"].tobytes()
        outside = r["mask"][..., 0] == 0
        assert np.array_equal(r["image"][outside], r["source"][outside])
        assert not np.array_equal(r["image"], r["source"])
        text = r["text"]
        if r["op"] == "add":
            (new,) = set(tgt.objects) - set(src.objects)
            assert all(w in text for w in (new.size, new.colour, new.shape))
            assert new.position in text or (new.position == "center" and "middle" in text)
        else:
            (old,) = set(src.objects) - set(tgt.objects)
            assert old.colour in text and old.shape in text
            if r["op"] == "move":
                (moved,) = set(tgt.objects) - set(src.objects)
                assert text.endswith(moved.position)
            if r["op"] == "recolour":
                (new,) = set(tgt.objects) - set(src.objects)
                assert text.split()[-1] == new.colour or text.endswith("to " + new.colour)
    assert ops == {"recolour", "move", "remove", "add"}


def test_inpaint_and_sr_records():
    for i in range(40):
        r = S.make_record("inpaint", i)
        hole = r["mask"][..., 0] > 0
        assert r["mask"].shape == (64, 64, 1) and hole.any() and not hole.all()
        assert (r["source"][hole] == 0).all() and np.array_equal(r["source"][~hole], r["image"][~hole])
    r = S.make_record("sr", 0, image_size=64)
    assert r["low_res"].shape == (16, 16, 3) and r["source"].shape == r["image"].shape == (64, 64, 3)
    block = r["image"][:4, :4].astype(float).mean((0, 1))
    assert np.abs(r["low_res"][0, 0] - block).max() <= 0.5
    assert np.array_equal(r["source"][:4, :4], np.broadcast_to(r["low_res"][0, 0], (4, 4, 3)))
    with pytest.raises(ValueError):
        S.ShapesSource("sr", image_size=66)


def test_grain_map_dataset_shuffles_and_batches_deterministically():
    import grain

    src = S.ShapesSource("generate", num_records=32, image_size=32)

    def first_epoch():
        ds = grain.MapDataset.source(src).shuffle(seed=3).batch(8)
        return [ds[i] for i in range(len(ds))]

    a, b = first_epoch(), first_epoch()
    assert len(a) == 4 and a[0]["image"].shape == (8, 32, 32, 3) and a[0]["text"].shape == (8,)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["image"], y["image"]) and list(x["text"]) == list(y["text"])
    order = np.concatenate([x["index"] for x in a])
    assert sorted(order.tolist()) == list(range(32)) and order.tolist() != list(range(32))
    assert np.array_equal(a[0]["image"][0], src[int(order[0])]["image"])
    # the DataLoader path with an index sampler, no worker processes
    loader = grain.DataLoader(
        data_source=src,
        sampler=grain.samplers.IndexSampler(len(src), grain.sharding.NoSharding(), shuffle=True, num_epochs=1, seed=3),
        worker_count=0,
    )
    idx = [int(r["index"]) for r in loader]
    idx2 = [int(r["index"]) for r in loader]
    assert idx == idx2 and sorted(idx) == list(range(32))


def test_modules_import_no_jax():
    code = (
        "import sys, microforge_jax.data.shapes, microforge_jax.eval, microforge_jax.eval.shapes_eval;"
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_objects_p_sets_the_object_count_mix_and_keeps_the_default_stream():
    # The default mix draws exactly the scenes of the world's own sampler (records unchanged):
    # the count from one choice over (0.4, 0.35, 0.25), then the scene of that count.
    assert S.NUM_OBJECTS_P == (0.4, 0.35, 0.25)
    for i in range(20):
        rng_a, rng_b = S._rng(0, "train", "generate", i), S._rng(0, "train", "generate", i)
        n = int(rng_b.choice(3, p=[0.4, 0.35, 0.25])) + 1
        assert S.sample_scene(rng_a) == S.sample_scene(rng_b, num_objects=n)
    # Degenerate mixes give only that count; a skewed one its proportion (n = 600: 4 sigma is 0.065).
    for k in range(3):
        p = tuple(float(j == k) for j in range(3))
        src = S.ShapesSource("generate", num_records=30, image_size=32, objects_p=p)
        assert {len(S.scene_from_json(src[i]["scene"]).objects) for i in range(30)} == {k + 1}
    counts = np.bincount(
        [len(S.sample_scene(S._rng(0, "train", "generate", i), objects_p=(0.8, 0.1, 0.1)).objects) for i in range(600)],
        minlength=4,
    )
    assert abs(counts[1] / 600 - 0.8) < 0.065 and counts[2] > 0 and counts[3] > 0
    # A one-object scene keeps the rest of its stream: same first object as under the default
    # mix whenever the default also drew one object.
    for i in range(40):
        default = S.sample_scene(S._rng(0, "train", "generate", i))
        single = S.sample_scene(S._rng(0, "train", "generate", i), objects_p=(1.0, 0.0, 0.0))
        if len(default.objects) == 1:
            assert single == default
    for bad in [(0.5, 0.5), (0.5, 0.6, 0.1), (-0.1, 0.6, 0.5)]:
        with pytest.raises(ValueError, match="objects_p"):
            S.ShapesSource("generate", objects_p=bad)


def test_generate_records_mark_the_cells_their_caption_places():
    named = unnamed = 0
    for i in range(300):
        rec = S.make_record("generate", i)
        scene = S.scene_from_json(rec["scene"])
        assert rec["cells"].dtype == np.float32 and rec["cells"].shape == (9,)
        if any(p in rec["text"] for p in POSITIONS):
            expected = np.zeros(9, np.float32)
            expected[[o.cell for o in scene.objects]] = 1
            np.testing.assert_array_equal(rec["cells"], expected)
            named += 1
        else:  # "red circle, blue square": a weight from cells would depend on more than the caption
            np.testing.assert_array_equal(rec["cells"], np.zeros(9, np.float32))
            unnamed += 1
    assert named > 200 and unnamed > 5
