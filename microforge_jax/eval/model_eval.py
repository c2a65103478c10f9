"""ShapesEval of a trained run: generation on held-out prompts, VAE reconstruction, recolour edits.

    python -m microforge_jax.eval --workdir runs/nano [--num 200] [--steps 25] [--cfg 4]

* generation: scenes of the "heldout" split (each with a (colour, shape) pair never seen in
  training), captioned with the templates that name every attribute, cycled so the text encoder
  sees paraphrases; scored by ShapesEval (single-object colour+shape, all attributes of 2-3-object
  scenes, per-attribute accuracies);
* VAE: reconstruction PSNR of held-out scenes through encode (posterior mode) and decode;
* edit: recolour instructions on held-out sources; success = the target scene is read back
  (colour, shape, size, position, count) and the rest of the image is preserved (PSNR outside the
  edited region >= shapes_eval.PRESERVE_PSNR_DB).

Results go to `<workdir>/eval.json` and are printed as tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from microforge_jax.data.shapes import caption_for, make_record, render_scene, scene_for_index, scene_from_json
from microforge_jax.eval import shapes_eval

# Caption templates that name every attribute (colour, shape, size, position) of every object.
FULL_TEMPLATES = (0, 1, 4, 5, 6)


def eval_prompts(num: int, split: str) -> tuple[list[Any], list[str]]:
    """The first `num` scenes of `split` and their captions, cycling through FULL_TEMPLATES."""
    scenes = [scene_for_index(i, split) for i in range(num)]
    return scenes, [caption_for(s, FULL_TEMPLATES[i % len(FULL_TEMPLATES)]) for i, s in enumerate(scenes)]


def _generation(
    pipe, num: int, steps: int, cfg: float, seed: int, split: str, batch: int, sampler: str | None = None
) -> dict[str, Any]:
    scenes, captions = eval_prompts(num, split)
    images = []
    for i in range(0, num, batch):
        images.append(pipe.generate(captions[i : i + batch], steps=steps, cfg=cfg, seed=seed + i, sampler=sampler))
    images = np.concatenate(images)
    report = shapes_eval.evaluate(images, scenes)
    report.pop("per_image")
    return {"report": report, "images": images[:16], "captions": captions[:16]}


def _vae_roundtrip(pipe, num: int, split: str) -> dict[str, Any]:
    """PSNR and ShapesEval of VAE reconstructions (encode to the posterior mode, decode).

    The ShapesEval of the reconstructions is the ceiling of what generation can score through
    this decoder: an object the VAE cannot redraw legibly cannot be generated legibly either.
    """
    import jax  # noqa: PLC0415

    from microforge_jax.models.vae import build_vae  # noqa: PLC0415

    size = int(pipe.config.image_size)
    vae = build_vae(pipe.model_cfg)
    scenes = [scene_for_index(i, split) for i in range(num)]
    images = np.stack([render_scene(s, size) for s in scenes])
    x = images.astype(np.float32) / 127.5 - 1.0
    roundtrip = jax.jit(lambda p, x: vae.apply(p, vae.apply(p, x, method=vae.encode).mode(), method=vae.decode))
    recon = np.concatenate([np.asarray(roundtrip(pipe.params["vae"], x[i : i + 32])) for i in range(0, num, 32)])
    recon = np.clip((recon + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    report = shapes_eval.evaluate(recon, scenes)
    report.pop("per_image")
    psnr = float(np.mean([shapes_eval.psnr(a, b) for a, b in zip(images, recon, strict=True)]))
    return {"psnr_db": psnr, "readback": report}


def _recolour_edits(
    pipe, num: int, steps: int, cfg: float, seed: int, split: str, sampler: str | None = None, strength: float = 1.0
) -> dict[str, Any]:
    size = int(pipe.config.image_size)
    records, i = [], 0
    while len(records) < num and i < 50 * num:
        rec = make_record("edit", i, split, size)
        if str(rec["op"]) == "recolour":
            records.append(rec)
        i += 1
    results = []
    for j in range(0, len(records), 32):
        chunk = records[j : j + 32]
        sources = np.stack([r["source"] for r in chunk])
        texts = [str(r["text"]) for r in chunk]
        edited = pipe.edit(sources, texts, steps=steps, cfg=cfg, seed=seed + j, sampler=sampler, strength=strength)
        for r, out in zip(chunk, edited, strict=True):
            results.append(shapes_eval.evaluate_edit(r["source"], out, scene_from_json(str(r["scene"])), r["mask"]))
    return {
        "num": len(results),
        "success": float(np.mean([r["all"] for r in results])) if results else None,
        "target_read_back": float(np.mean([all(o["colour"] and o["shape"] for o in r["objects"]) for r in results]))
        if results
        else None,
        "preserved": float(np.mean([r["preserved"] for r in results])) if results else None,
        "psnr_outside_db": float(np.mean([r["psnr_outside"] for r in results])) if results else None,
    }


def evaluate_run(
    workdir: str | Path,
    *,
    num: int = 200,
    steps: int = 25,
    cfg: float = 4.0,
    seed: int = 0,
    edits: int = 64,
    split: str = "heldout",
    batch: int = 32,
    write: bool = True,
    sampler: str | None = None,
    edit_strength: float = 1.0,
) -> dict[str, Any]:
    """Evaluates a run (see the module docstring); writes `<workdir>/eval.json` and a sample grid.

    `sampler` (one of `sampling.SAMPLERS`) picks the step rule; None: the pipeline's default (the
    consistency sampler at <= 4 steps for a consistency-distilled run, Euler otherwise).
    `edit_strength`: the edits' `strength` (1: from pure noise; below 1 from the noised source).

    Returns:
      {"generation": report, "vae_psnr_db": float, "vae_readback": report of the reconstructions,
       "edit": {...}, "settings": {...}, "seconds": float}.
    """
    from microforge_jax.pipeline import MicroForgePipeline, make_grid  # noqa: PLC0415

    t0 = time.perf_counter()
    workdir = Path(workdir)
    pipe = MicroForgePipeline.from_run(workdir)
    gen = _generation(pipe, num, steps, cfg, seed, split, batch, sampler)
    settings = {
        "num": num, "steps": steps, "cfg": cfg, "seed": seed, "split": split, "edits": edits,
        "edit_strength": edit_strength,
    }  # fmt: skip
    result: dict[str, Any] = {
        "settings": {**settings, "sampler": pipe.resolve_sampler(sampler, steps)},
        "generation": gen["report"],
    }
    vae = _vae_roundtrip(pipe, min(num, 128), split)
    result["vae_psnr_db"] = vae["psnr_db"]
    result["vae_readback"] = vae["readback"]
    has_edit = (workdir / "checkpoints" / "edit").is_dir()
    result["edit"] = (
        _recolour_edits(pipe, edits, steps, cfg, seed, split, sampler, edit_strength) if has_edit and edits else None
    )
    result["seconds"] = time.perf_counter() - t0
    if write:
        (workdir / "eval.json").write_text(json.dumps(result, indent=2))
        from PIL import Image  # noqa: PLC0415

        Image.fromarray(make_grid(gen["images"], 4)).save(workdir / "eval_grid.png")
        (workdir / "eval_grid.txt").write_text("\n".join(gen["captions"]) + "\n")
    return result


def format_result(result: dict[str, Any]) -> str:
    """Tables of a run's evaluation."""
    s = result["settings"]
    lines = [
        f"Generation on {s['split']} prompts ({s['num']} prompts, {s['steps']} {s.get('sampler', 'euler')} steps, "
        f"guidance {s['cfg']}):",
        shapes_eval.format_table(result["generation"]),
        "",
        f"VAE reconstruction PSNR ({s['split']} scenes): {result['vae_psnr_db']:.2f} dB",
    ]
    rb = result.get("vae_readback")
    if rb:
        lines.append(
            f"ShapesEval of the VAE's reconstructions (the ceiling for generation): single colour+shape "
            f"{100 * rb['single_colour_shape']:.1f}%, 2-3-object all {100 * rb['multi_all']:.1f}%, "
            f"shape {100 * rb['shape']:.1f}%"
        )
    e = result.get("edit")
    if e:
        lines.append(
            f"Recolour edits ({e['num']}, strength {s.get('edit_strength', 1.0):g}): success {100 * e['success']:.1f}% "
            f"(target read back {100 * e['target_read_back']:.1f}%, rest preserved {100 * e['preserved']:.1f}%, "
            f"PSNR outside {e['psnr_outside_db']:.1f} dB)"
        )
    return "\n".join(lines)


SEED_METRICS = ("colour", "shape", "size", "position", "count", "single_colour_shape", "multi_all", "all")


def summarize_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (population std) over seeds of each generation metric and the edit success.

    Args:
      results: `evaluate_run` results of the same run and prompts with different seeds.

    Returns:
      {"seeds": [...], "generation": {metric: {"mean", "std", "values"}}, "edit_success": {...} or None}.
    """

    def stats(values: list[float]) -> dict[str, Any]:
        v = np.asarray(values, np.float64)
        return {"mean": float(v.mean()), "std": float(v.std()), "values": [float(x) for x in v]}

    gen = {
        k: stats([r["generation"][k] for r in results])
        for k in SEED_METRICS
        if all(r["generation"].get(k) is not None for r in results)
    }
    edits = [r["edit"]["success"] for r in results if r.get("edit")]
    return {
        "seeds": [r["settings"]["seed"] for r in results],
        "generation": gen,
        "edit_success": stats(edits) if len(edits) == len(results) else None,
    }


def format_seeds(summary: dict[str, Any]) -> str:
    """One line per metric: mean +- std over the seeds (percent)."""
    lines = [f"Over seeds {summary['seeds']} (mean +- std):"]
    rows = list(summary["generation"].items())
    if summary["edit_success"] is not None:
        rows.append(("recolour edit success", summary["edit_success"]))
    for key, st in rows:
        lines.append(f"  {key:<24}{100 * st['mean']:6.1f}% +- {100 * st['std']:.1f}")
    return "\n".join(lines)
