"""Tests for ShapesEval: near-perfect on ground truth, near chance on mismatches, catches single changes."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microforge_jax.data import shapes as S
from microforge_jax.data.shapes_render import COLOURS, SHAPES, render_scene
from microforge_jax.eval import shapes_eval as E
from microforge_jax.eval.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("colour", "shape", "size", "position", "count", "all", "single_colour_shape", "multi_all")


@pytest.fixture(scope="module")
def gt64():
    scenes = [S.scene_for_index(i, "heldout" if i % 2 else "train") for i in range(200)]
    return scenes, [render_scene(s, 64) for s in scenes]


@pytest.mark.parametrize("resolution,num", [(64, 200), (256, 50)])
def test_ground_truth_scores_near_perfect(resolution, num, gt64):
    scenes = gt64[0][:num]
    images = gt64[1] if resolution == 64 else [render_scene(s, resolution) for s in scenes]
    report = E.evaluate(images, scenes)
    for k in METRICS:
        assert report[k] >= 0.99, (k, report[k])
    assert "%" in E.format_table(report)


def test_shuffled_pairs_near_chance(gt64):
    scenes, images = gt64
    perm = np.random.default_rng(0).permutation(len(scenes))
    report = E.evaluate([images[p] for p in perm], scenes)
    assert report["all"] < 0.1 and report["colour"] < 0.4 and report["shape"] < 0.4 and report["position"] < 0.4


def _change(scene, attr, rng):
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    free = [c for c in range(9) if c not in {p.cell for p in objs}]
    if attr == "colour":
        objs[i] = dataclasses.replace(o, colour=str(rng.choice([c for c in COLOURS if c != o.colour])))
    elif attr == "shape":
        objs[i] = dataclasses.replace(o, shape=str(rng.choice([s for s in SHAPES if s != o.shape])))
    elif attr == "size":
        objs[i] = dataclasses.replace(o, size="small" if o.size == "large" else "large")
    elif attr == "position":
        objs[i] = dataclasses.replace(o, cell=int(rng.choice(free)))
    elif len(objs) > 1 and rng.random() < 0.5:  # count: remove one ...
        objs.pop(i)
    else:  # ... or add a copy elsewhere
        objs.append(dataclasses.replace(o, cell=int(rng.choice(free))))
    return dataclasses.replace(scene, objects=tuple(objs)), i


@pytest.mark.parametrize("attr", ["colour", "shape", "size", "position", "count"])
def test_detects_single_attribute_change(attr, gt64):
    rng = np.random.default_rng(1)
    scenes = gt64[0][:100]
    flagged = []
    for scene in scenes:
        changed, i = _change(scene, attr, rng)
        r = E.evaluate_image(render_scene(changed, 64), scene)
        flagged.append(not r["count"] if attr == "count" else not r["objects"][i][attr])
        assert not r["all"]
    assert np.mean(flagged) >= 0.95


def test_tolerates_noise_and_float_input(gt64):
    scenes, images = gt64[0][:60], gt64[1][:60]
    rng = np.random.default_rng(0)
    noisy = [np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8) for im in images]
    assert E.evaluate(noisy, scenes)["all"] >= 0.95
    assert E.evaluate_image(images[0].astype(np.float32) / 255.0, scenes[0])["all"]
    with pytest.raises(ValueError):
        E.evaluate_image(images[0][:, :40], scenes[0])


def test_evaluate_edit():
    for i in range(12):
        r = S.make_record("edit", i)
        tgt = S.scene_from_json(r["scene"])
        res = E.evaluate_edit(r["source"], r["image"], tgt, r["mask"])
        assert res["all"] and res["preserved"] and res["psnr_outside"] >= E.PRESERVE_PSNR_DB
        assert not E.evaluate_edit(r["source"], r["source"], tgt, r["mask"])["all"]  # edit not done
        damaged = r["image"].copy()
        damaged[r["mask"][..., 0] == 0] = 255 - damaged[r["mask"][..., 0] == 0]
        res = E.evaluate_edit(r["source"], damaged, tgt, r["mask"])
        assert not res["preserved"] and not res["all"]


def test_evaluate_generator_takes_any_callable(gt64):
    scenes = gt64[0][:20]
    captions = [S.caption_for(s, 0) for s in scenes]
    lookup = dict(zip(captions, scenes, strict=True))
    calls = []

    def generate(batch):
        calls.append(len(batch))
        return np.stack([render_scene(lookup[c], 64) for c in batch])

    report = E.evaluate_generator(generate, scenes, captions, batch_size=8)
    assert calls == [8, 8, 4] and report["all"] == 1.0
    with pytest.raises(ValueError):
        E.evaluate_generator(lambda b: [], scenes, captions)


def test_cli_ground_truth_and_images(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["--num", "30", "--resolution", "64", "--split", "heldout", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["all"] == 1.0 and report["num_images"] == 30 and len(report["per_image"]) == 30
    # an external sampler's folder: prompts dumped, PNGs named by index, scored from the dump
    prompts = tmp_path / "prompts.json"
    assert main(["--num", "6", "--split", "heldout", "--dump-prompts", str(prompts)]) == 0
    folder = tmp_path / "samples"
    folder.mkdir()
    for p in json.loads(prompts.read_text()):
        Image.fromarray(render_scene(S.Scene.from_dict(p["scene"]), 96)).save(folder / f"{p['index']:05d}.png")
    assert main(["--images", str(folder), "--scenes", str(prompts), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["all"] == 1.0
    capsys.readouterr()


def test_cli_bad_input_one_line_exit_2(tmp_path):
    (tmp_path / "0.png").write_bytes(b"not a png")
    cases = [
        ["--images", str(tmp_path / "missing")],
        ["--images", str(tmp_path)],
        ["--num", "0"],
        ["--workdir", str(tmp_path), "--edit-strength", "0"],  # refused before the run is read
    ]
    for args in cases:
        p = subprocess.run(
            [sys.executable, "-m", "microforge_jax.eval", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_seed_summary_is_mean_and_population_std_by_hand():
    from microforge_jax.eval import model_eval

    def result(seed, single, multi, edit):
        gen = dict.fromkeys(model_eval.SEED_METRICS, 0.5)
        gen.update(single_colour_shape=single, multi_all=multi)
        return {"settings": {"seed": seed}, "generation": gen, "edit": {"success": edit}}

    summary = model_eval.summarize_seeds(
        [result(0, 0.6, 0.2, 0.25), result(1, 0.7, 0.4, 0.5), result(2, 0.8, 0.3, 0.0)]
    )
    assert summary["seeds"] == [0, 1, 2]
    single = summary["generation"]["single_colour_shape"]
    assert abs(single["mean"] - 0.7) < 1e-12 and abs(single["std"] - (0.02 / 3) ** 0.5) < 1e-12
    assert abs(summary["generation"]["multi_all"]["mean"] - 0.3) < 1e-12
    assert summary["generation"]["colour"]["std"] == 0.0
    edit = summary["edit_success"]
    assert abs(edit["mean"] - 0.25) < 1e-12 and abs(edit["std"] - (0.125 / 3) ** 0.5) < 1e-12
    assert "single_colour_shape" in model_eval.format_seeds(summary)
    no_edits = model_eval.summarize_seeds([{**result(0, 0.6, 0.2, 0.0), "edit": None}])
    assert no_edits["edit_success"] is None
