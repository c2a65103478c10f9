"""ShapesEval from the command line.

  python -m microforge_jax.eval --num 200 --resolution 64 --split heldout --out eval.json
      scores the dataset's own renders of the first N prompts of a split (a sanity check: ~100%).
  python -m microforge_jax.eval --split heldout --num 200 --dump-prompts prompts.json
      writes [{"index", "caption", "scene"}] for an external sampler, which saves `<index>.png`.
  python -m microforge_jax.eval --workdir runs/nano [--num 200 --steps 25 --cfg 4 --edits 64]
      evaluates a trained run: generation on held-out prompts, VAE PSNR, recolour edits
      (microforge_jax.eval.model_eval; writes <workdir>/eval.json).
  python -m microforge_jax.eval --images DIR [--scenes scenes.json] --split heldout --out eval.json
      scores PNGs named by prompt index (`7.png`, `00007.png`); scenes come from --scenes (a JSON list
      of scene dicts, or the --dump-prompts file), else DIR/scenes.json, else the split's prompts.
  python -m microforge_jax.eval --workdir runs/tiny --data DIR --fid --inception inception.safetensors \
      --clip-score --clip CLIP_FOLDER [--num 1000 --seeds 2]
      FID and CLIP score against a captioned image folder (microforge_jax.eval.reference_eval;
      writes <workdir>/fid_clip.json).
Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from microforge_jax.data.shapes import SPLITS, Scene, caption_for, render_scene, scene_for_index
from microforge_jax.eval.shapes_eval import evaluate, evaluate_generator, format_table


class InputError(Exception):
    """Bad user input: reported as one line, exit status 2."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m microforge_jax.eval", description="ShapesEval (analytic).")
    p.add_argument("--num", type=int, default=None, help="number of prompts (default 200; all PNGs with --images)")
    p.add_argument("--resolution", type=int, default=64, help="render resolution for ground-truth scoring")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--seed", type=int, default=0, help="dataset seed of the prompts")
    p.add_argument("--template", type=int, default=0, help="caption template of the prompts")
    p.add_argument("--images", type=Path, default=None, help="folder of <index>.png to score")
    p.add_argument("--scenes", type=Path, default=None, help="JSON scenes for --images")
    p.add_argument("--dump-prompts", type=Path, default=None, help="write the prompts as JSON and exit")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    p.add_argument("--workdir", type=Path, default=None, help="evaluate a trained run (model_eval)")
    p.add_argument(
        "--seeds", type=int, default=1,
        help="--workdir: evaluate with this many seeds (--seed, --seed + 1, ...) and report mean and spread",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=25, help="sampling steps (--workdir)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (--workdir)")
    p.add_argument("--edits", type=int, default=64, help="recolour edits to score (--workdir; 0: none)")
    p.add_argument(
        "--edit-strength", type=float, default=1.0, help="the edits' strength in (0, 1] (--workdir; 1: from noise)"
    )
    p.add_argument(
        "--sampler", choices=("euler", "consistency", "heun", "dpm++2m"), default=None,
        help="step rule (--workdir); default: consistency at <= 4 steps for a consistency-distilled run, else euler",
    )  # fmt: skip
    p.add_argument("--fid", action="store_true", help="--workdir --data: FID against the folder (needs --inception)")
    p.add_argument("--clip-score", action="store_true", help="--workdir --data: CLIP score (needs --clip)")
    p.add_argument("--data", type=Path, default=None, help="reference folder: images + metadata.jsonl or .txt captions")
    p.add_argument("--inception", type=Path, default=None, help="FID Inception weights (.safetensors, see README)")
    p.add_argument("--clip", type=Path, default=None, help="a Hugging Face CLIPModel folder (with model.safetensors)")
    return p.parse_args(argv)


def _check_reference_args(args: argparse.Namespace) -> None:
    """The --fid / --clip-score flags, checked before anything is loaded."""
    from microforge_jax.data.imagefolder import scan_folder  # noqa: PLC0415

    if args.workdir is None:
        raise InputError("--fid and --clip-score evaluate a run: give --workdir")
    if args.data is None:
        raise InputError("--fid and --clip-score need --data, a folder of captioned reference images")
    if args.fid and args.inception is None:
        raise InputError(
            "--fid needs --inception, the FID Inception weights (python -m microforge_jax.eval.inception "
            "--convert pt_inception-2015-12-05-6726825d.pth --out inception.safetensors)"
        )
    if args.fid and not args.inception.is_file():
        raise InputError(f"--inception weights file not found: {args.inception}")
    if args.clip_score and args.clip is None:
        raise InputError("--clip-score needs --clip, a Hugging Face CLIPModel folder")
    if args.clip_score and not (args.clip / "config.json").is_file():
        raise InputError(f"--clip folder not found or without config.json: {args.clip}")
    if not args.workdir.is_dir():
        raise InputError(f"--workdir not found: {args.workdir}")
    scan_folder(args.data)  # a missing folder or one without captioned images: ImageFolderError


def _load_scenes(path: Path) -> list[Scene] | dict[int, Scene]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read scenes file {path}: {e}") from None
    if isinstance(data, dict) and "scenes" in data:
        data = data["scenes"]
    if not isinstance(data, list):
        raise InputError(f"scenes file {path} must hold a JSON list")
    try:
        if data and isinstance(data[0], dict) and "index" in data[0]:  # the --dump-prompts format
            return {int(d["index"]): Scene.from_dict(d["scene"]) for d in data}
        return [Scene.from_dict(d) for d in data]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"bad scene in {path}: {e}") from None


def _load_images(folder: Path, num: int | None) -> dict[int, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise InputError(f"--images folder not found: {folder}")
    paths = {}
    for p in folder.glob("*.png"):
        if p.stem.isdigit():
            paths[int(p.stem)] = p
    if not paths:
        raise InputError(f"no PNGs named by index (e.g. 0.png) in {folder}")
    images = {}
    for i in sorted(paths)[:num]:
        try:
            with Image.open(paths[i]) as im:
                images[i] = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise InputError(f"cannot read image {paths[i]}: {e}") from None
        if images[i].shape[0] != images[i].shape[1]:
            raise InputError(f"image {paths[i]} is not square: {images[i].shape[1]}x{images[i].shape[0]}")
    return images


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Runs one command line; returns the report (None for --dump-prompts)."""
    if args.num is not None and args.num <= 0:
        raise InputError(f"--num must be positive, got {args.num}")
    if args.resolution < 12:
        raise InputError(f"--resolution must be at least 12, got {args.resolution}")
    if args.fid or args.clip_score:
        _check_reference_args(args)
        if args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        if args.seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {args.seeds}")
        from microforge_jax.eval import reference_eval  # noqa: PLC0415 (loads jax and the models)

        result = reference_eval.evaluate_reference(
            args.workdir, args.data, inception=args.inception if args.fid else None,
            clip=args.clip if args.clip_score else None, num=args.num, steps=args.steps, cfg=args.cfg,
            seed=args.seed, seeds=args.seeds, sampler=args.sampler,
        )  # fmt: skip
        print(reference_eval.format_result(result))
        out = reference_eval.write_result(result, args.out or args.workdir / reference_eval.RESULT_FILE)
        print(f"wrote {out}")
        return None
    if args.workdir is not None:
        from microforge_jax.eval import model_eval  # noqa: PLC0415 (loads jax and the model)

        if args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        if not 0.0 < args.edit_strength <= 1.0:
            raise InputError(f"--edit-strength must be in (0, 1], got {args.edit_strength}")
        if args.seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {args.seeds}")
        # With --out the report goes there (eval.json and the grid are left as they are).
        results = [
            model_eval.evaluate_run(
                args.workdir,
                num=200 if args.num is None else args.num,
                steps=args.steps,
                cfg=args.cfg,
                seed=args.seed + i,
                edits=args.edits,
                split=args.split,
                sampler=args.sampler,
                write=args.out is None and i == 0,
                edit_strength=args.edit_strength,
            )  # fmt: skip
            for i in range(args.seeds)
        ]
        result = results[0]
        print(model_eval.format_result(result))
        if args.seeds > 1:
            result = {**result, "seeds": model_eval.summarize_seeds(results), "per_seed": results}
            print(model_eval.format_seeds(result["seeds"]))
            if args.out is None:
                (args.workdir / "eval.json").write_text(json.dumps(result, indent=2))
        target = args.workdir / "eval.json" if args.out is None else args.out
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {target}")
        return None
    if args.dump_prompts is not None:
        num = 200 if args.num is None else args.num
        prompts = []
        for i in range(num):
            s = scene_for_index(i, args.split, args.seed)
            prompts.append({"index": i, "caption": caption_for(s, args.template), "scene": s.to_dict()})
        args.dump_prompts.write_text(json.dumps(prompts, indent=1))
        print(f"wrote {num} prompts to {args.dump_prompts}")
        return None
    if args.images is not None:
        images = _load_images(args.images, args.num)
        scenes_path = args.scenes or (args.images / "scenes.json")
        if args.scenes is not None and not args.scenes.is_file():
            raise InputError(f"--scenes file not found: {args.scenes}")
        source = _load_scenes(scenes_path) if scenes_path.is_file() else None
        scenes = []
        for i in images:
            if source is None:
                scenes.append(scene_for_index(i, args.split, args.seed))
            elif (isinstance(source, dict) and i in source) or (isinstance(source, list) and i < len(source)):
                scenes.append(source[i])
            else:
                raise InputError(f"no scene for image index {i} in {scenes_path}")
        report = evaluate(list(images.values()), scenes)
    else:
        num = 200 if args.num is None else args.num
        scenes = [scene_for_index(i, args.split, args.seed) for i in range(num)]
        captions = [caption_for(s, args.template) for s in scenes]
        by_caption = dict(zip(captions, scenes, strict=True))

        def ground_truth(batch: list[str]) -> list[np.ndarray]:
            # Stands in for a model: draws the scene each caption describes.
            return [render_scene(by_caption[c], args.resolution) for c in batch]

        report = evaluate_generator(ground_truth, scenes, captions)
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        report = run(args)
        if report is None:
            return 0
        print(format_table(report))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            print(f"wrote {args.out}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
