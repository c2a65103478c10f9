"""FID and CLIP score of a trained run against a folder of captioned reference images.

    python -m microforge_jax.eval --workdir runs/tiny --data my_images --fid --inception inception.safetensors \
        --clip-score --clip clip-vit-large-patch14 [--num 1000 --seeds 2 --steps 25 --cfg 4]

The folder has the training image folder's format (`microforge_jax.data.imagefolder`): images with
a `metadata.jsonl` (file_name, text) or a `.txt` caption beside each. The run generates one image
per caption and seed (seeds `seed`, `seed + 1`, ...). Reference images are resized and
centre-cropped to the run's `image_size`, as the trainer reads them, so FID compares the model
with what it was trained to draw.

* FID: pool3 features of the FID Inception (`eval.inception`, pytorch-fid's network and
  preprocessing) of all generated images against all reference images (`eval.fid`). FID is
  biased upward at small N (below ~2,000 images a set): compare runs at the same N only.
* CLIP score: torchmetrics' CLIPScore of each generated image with its caption (`eval.clip_score`);
  the reference images' own score is reported beside it, as a ceiling.

Results go to `<workdir>/fid_clip.json` (or `--out`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from microforge_jax.data.imagefolder import ImageFolderError, load_image, scan_folder

RESULT_FILE = "fid_clip.json"


def load_references(pairs: list[tuple[str, str]], image_size: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Reads the reference images at `image_size` (resize shorter side, centre crop).

    Returns:
      (uint8 images (N, S, S, 3), their captions, paths of unreadable images that were left out).

    Raises:
      ImageFolderError: no image can be read.
    """
    images, captions, skipped = [], [], []
    for path, caption in pairs:
        try:
            images.append(load_image(path, image_size))
        except (OSError, ValueError, SyntaxError):  # PIL's errors for corrupt or missing files
            skipped.append(path)
            continue
        captions.append(caption)
    if not images:
        raise ImageFolderError(f"none of the {len(pairs)} reference images can be read (e.g. {skipped[0]})")
    return np.stack(images), captions, skipped


def evaluate_reference(
    workdir: str | Path,
    data: str | Path,
    *,
    inception: str | Path | None = None,
    clip: str | Path | None = None,
    num: int | None = None,
    steps: int = 25,
    cfg: float = 4.0,
    seed: int = 0,
    seeds: int = 1,
    sampler: str | None = None,
    batch: int = 32,
) -> dict[str, Any]:
    """Generates from the folder's captions and scores FID (with `inception`) and CLIP score (with `clip`).

    Everything the user pointed at (folder, weights) is loaded and checked before the run is.

    Args:
      workdir: the run.
      data: the reference folder.
      inception: the FID Inception safetensors file; None: no FID.
      clip: a Hugging Face CLIPModel folder; None: no CLIP score.
      num: use the first `num` captioned images (sorted by path); None: all.
      steps, cfg, sampler: sampling settings (`MicroForgePipeline.generate`).
      seed: the first seed; `seeds` images per caption with seeds seed, seed + 1, ...
      batch: prompts per sampling call.

    Returns:
      {"settings", "num_reference", "skipped_reference", "fid", "clip_score", "clip_score_reference",
       "per_seed": [{"seed", "fid", "clip_score"}], "seconds"}; absent metrics are None.
    """
    from microforge_jax.eval.clip_score import CLIPScorer, clip_score  # noqa: PLC0415
    from microforge_jax.eval.fid import InceptionFeatures, fid_from_features  # noqa: PLC0415
    from microforge_jax.pipeline import MicroForgePipeline  # noqa: PLC0415

    t0 = time.perf_counter()
    pairs = scan_folder(data)[:num]
    extractor = InceptionFeatures(inception) if inception is not None else None
    scorer = CLIPScorer(clip) if clip is not None else None
    if extractor is not None and len(pairs) < 2:
        raise ImageFolderError(f"FID needs at least 2 reference images, {data} has {len(pairs)} (with --num)")
    pipe = MicroForgePipeline.from_run(workdir)
    size = int(pipe.config.get("image_size", 64))
    ref_images, captions, skipped = load_references(pairs, size)

    ref_features = extractor.features(ref_images) if extractor else None
    ref_cos = scorer.cosines(ref_images, captions) if scorer else None
    per_seed, gen_features, gen_cos = [], [], []
    for k in range(seeds):
        s = seed + k
        images = np.concatenate(
            [
                pipe.generate(captions[i : i + batch], steps=steps, cfg=cfg, seed=s + i, sampler=sampler)
                for i in range(0, len(captions), batch)
            ]
        )
        row: dict[str, Any] = {"seed": s, "fid": None, "clip_score": None}
        if extractor is not None:
            gen_features.append(extractor.features(images))
            row["fid"] = fid_from_features(gen_features[-1], ref_features) if len(images) >= 2 else None
        if scorer is not None:
            gen_cos.append(scorer.cosines(images, captions))
            row["clip_score"] = clip_score(gen_cos[-1])
        per_seed.append(row)
    return {
        "settings": {
            "data": str(data),
            "num": len(captions),
            "steps": steps,
            "cfg": cfg,
            "seed": seed,
            "seeds": seeds,
            "sampler": pipe.resolve_sampler(sampler, steps),
            "image_size": size,
            "inception": None if inception is None else str(inception),
            "clip": None if clip is None else str(clip),
        },  # fmt: skip
        "num_reference": len(captions),
        "num_generated": len(captions) * seeds,
        "skipped_reference": skipped,
        "fid": fid_from_features(np.concatenate(gen_features), ref_features) if gen_features else None,
        "clip_score": clip_score(np.concatenate(gen_cos)) if gen_cos else None,
        "clip_score_reference": clip_score(ref_cos) if ref_cos is not None else None,
        "per_seed": per_seed,
        "seconds": time.perf_counter() - t0,
    }


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def format_result(result: dict[str, Any]) -> str:
    """A few lines: FID, CLIP score (generated and reference), per seed when there are several."""
    s = result["settings"]
    lines = [
        f"{result['num_generated']} images from {result['num_reference']} captions of {s['data']} "
        f"({s['seeds']} seed(s), {s['steps']} {s['sampler']} steps, guidance {s['cfg']}, {s['image_size']} px)"
    ]
    if result["skipped_reference"]:
        lines.append(f"  {len(result['skipped_reference'])} unreadable reference image(s) left out")
    if result["fid"] is not None:
        lines.append(f"  FID (pytorch-fid Inception, vs {result['num_reference']} references): {result['fid']:.2f}")
    if result["clip_score"] is not None:
        lines.append(
            f"  CLIP score: {result['clip_score']:.2f} (reference images: {result['clip_score_reference']:.2f})"
        )
    if len(result["per_seed"]) > 1:
        for row in result["per_seed"]:
            fid = "" if row["fid"] is None else f" FID {row['fid']:.2f}"
            cs = "" if row["clip_score"] is None else f" CLIP score {row['clip_score']:.2f}"
            lines.append(f"  seed {row['seed']}:{fid}{cs}")
    return "\n".join(lines)
