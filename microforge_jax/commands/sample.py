"""Samples images from a MicroForge-JAX run: `python sample.py --prompt "a red circle"`.

    python sample.py --workdir runs/nano --prompt "a red circle" --num 4 --steps 20 --cfg 4
    python sample.py --task edit --source in.png --prompt "make the circle blue"
    python sample.py --source in.png --strength 0.6 --prompt "a red star"   # img2img: start from in.png, noised
    python sample.py --task edit --source in.png --prompt "make the circle blue" --strength 0.7  # keep more of it
    python sample.py --task inpaint --source in.png --mask hole.png --prompt "a red circle at the top"
    python sample.py --task sr --source low.png --size 64x64 --prompt "a red circle"
    python sample.py --steps 2 --prompt "a red circle"   # a consistency-distilled run: 2-step sampling
    python sample.py --sampler dpm++2m --steps 8 --prompt "a red circle"   # 2nd order: fewer steps than Euler

Writes one PNG per image and grid.png to --out, and prints the time per image (compile apart).
Installed as `microforge-sample` (pip install .), which takes the same flags.
"""

from __future__ import annotations

import argparse

from microforge_jax import cli

TASKS = ("generate", "edit", "inpaint", "sr")


def sample(argv: list[str]) -> int:
    """Parses the flags, then samples (raises on bad input; `main` makes that one line)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/nano", help="the run to sample from (default: python train.py's)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument(
        "--sampler",
        default=None,
        help="step rule: euler, heun (2 evaluations a step), dpm++2m or consistency (default: consistency "
        "when the run has a consistency stage and --steps <= 4, else euler)",
    )
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--size", default=None, help="HxW in pixels (default: the run's image_size)")
    p.add_argument("--shift", type=float, default=None, help="time-grid shift (default: the run's training shift)")
    p.add_argument("--task", default="generate", choices=TASKS, help="what to do")
    p.add_argument(
        "--source",
        default=None,
        help="source image (edit, inpaint), low-res image (sr), or (generate, with --strength < 1) the image to start from",
    )
    p.add_argument("--mask", default=None, help="inpaint mask image, the source's size (white = hole)")
    p.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="how much of the source to re-draw, in (0, 1]; below 1 sampling starts from the source noised "
        "to that level (SDEdit; diffusers' img2img strength), 1 from pure noise (generate: below 1, with --source)",
    )
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument(
        "--vae-tile", type=int, default=None, help="decode in tiles of N latent cells (less memory; 0: whole)"
    )
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the sampler for a lower peak memory on CPU (default: the run's sample_low_memory)",
    )
    args = p.parse_args(argv)

    from microforge_jax.pipeline import sample_to_folder  # imports jax: after --help

    sample_to_folder(
        args.workdir,
        args.prompt,
        prompts_file=args.prompts_file,
        num=args.num,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        size=args.size,
        task=args.task,
        source=args.source,
        mask=args.mask,
        out=args.out,
        shift=args.shift,
        sampler=args.sampler,
        strength=args.strength,
        vae_tile=args.vae_tile,
        low_memory=args.low_memory,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python sample.py` and `microforge-sample`: a user error is one line on stderr and exit code 2."""
    return cli.run(sample, argv)
