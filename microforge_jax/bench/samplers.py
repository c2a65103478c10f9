"""Few-step samplers against a converged solution: Euler, Heun and DPM-Solver++(2M) at equal evaluations.

    python -m microforge_jax.bench.samplers --workdir runs/nano [--prompts 8] [--seeds 3] [--nfe 8,12]
        [--reference-steps 100] [--no-check-reference] [--cfg 4] [--shift S] [--size N]

For a trained run: the same prompts (the shapes dataset's held-out captions) and the same noise are
sampled by each rule with about NFE denoiser evaluations and by `--reference-steps` Euler steps (the
reference). One evaluation is one guided denoiser call (the conditional and unconditional halves
stacked in one batch); Heun's n steps cost 2n - 1, so it gets the n nearest the budget (fewer on a
tie) and the table gives every rule's exact count. The distance is normwise relative,
||x - x_ref|| / ||x_ref|| over all prompts, on the final latents and on the decoded images, one
value per noise seed; the table gives the mean and the standard deviation over seeds.

The last row checks the reference: Euler with twice its steps. Euler's error falls as 1/steps, so
the reference is off the exact ODE solution by about twice that row's distance, and distances of
that size or below do not rank the rules (a first-order reference also favours Euler, whose errors
point the same way as its own).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from microforge_jax import cli

RULES = ("euler", "heun", "dpm++2m")


def steps_for(rule: str, nfe: int) -> int:
    """The step count whose evaluation count is nearest `nfe` (Heun: 2n - 1, fewer on a tie)."""
    return max(1, (nfe + 1) // 2) if rule == "heun" else nfe


def evaluations(rule: str, steps: int) -> int:
    """Denoiser evaluations of `steps` steps of a rule (Heun's last step, to t = 0, is an Euler step)."""
    return 2 * steps - 1 if rule == "heun" else steps


def normwise(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _spread(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """One markdown table of rows {"sampler", "steps", "nfe", "latent": [per seed], "image": [per seed]}."""
    lines = [
        "| sampler | steps | NFE | latent distance (mean ± std) | image distance (mean ± std) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {_spread(r['latent'])} | {_spread(r['image'])} |")
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m microforge_jax.bench.samplers", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the trained run")
    p.add_argument("--prompts", type=int, default=8, help="held-out shapes captions sampled per seed")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds 0 .. N-1 (the spread is over them)")
    p.add_argument("--nfe", default="8,12", help="comma-separated denoiser-evaluation budgets")
    p.add_argument("--reference-steps", type=int, default=100, help="Euler steps of the reference solution")
    p.add_argument(
        "--check-reference", action=argparse.BooleanOptionalAction, default=True,
        help="also run Euler with twice the reference's steps (the last row: the reference's own error)",
    )  # fmt: skip
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (1: no guidance)")
    p.add_argument("--shift", type=float, default=None, help="time-grid shift (default: the run's training shift)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: the run's image_size)")
    args = p.parse_args(argv)
    try:
        args.nfe = [int(x) for x in args.nfe.split(",") if x.strip()]
    except ValueError:
        raise cli.UserError(f"--nfe must be comma-separated integers, got {args.nfe!r}") from None
    for name, value in (
        ("--prompts", args.prompts),
        ("--seeds", args.seeds),
        ("--reference-steps", args.reference_steps),
    ):
        if value < 1:
            raise cli.UserError(f"{name} must be at least 1, got {value}")
    if not args.nfe or min(args.nfe) < 1:
        raise cli.UserError(f"--nfe needs positive budgets, got {args.nfe}")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    import jax  # noqa: PLC0415 (after the flags: --help stays fast)
    import jax.numpy as jnp  # noqa: PLC0415

    from microforge_jax import sampling  # noqa: PLC0415
    from microforge_jax.data.shapes import caption_for, scene_for_index  # noqa: PLC0415
    from microforge_jax.pipeline import MicroForgePipeline  # noqa: PLC0415

    pipe = MicroForgePipeline.from_run(args.workdir)
    cfg = pipe.model_cfg
    size = args.size or int(pipe.config.get("image_size", 64))
    pipe.check_size((size, size))
    shift = pipe.default_shift("generate") if args.shift is None else args.shift
    prompts = [caption_for(scene_for_index(i, "heldout", 0), 0) for i in range(args.prompts)]
    guided = args.cfg != 1.0
    text = pipe.encode(prompts)
    uncond = pipe.encode([""]) if guided else None
    f = cfg.vae.downsample_factor
    cases = [("euler", args.reference_steps)] + [(r, steps_for(r, n)) for n in args.nfe for r in RULES]
    cases += [("euler", 2 * args.reference_steps)] if args.check_reference else []
    fns = {
        case: sampling.make_sampler(
            cfg,
            case[1],
            guidance=guided,
            shift=shift,
            step_fn=sampling.step_rule(case[0])[0],
            vae_tile=int(pipe.config.get("sample_vae_tile", 0)),
        )
        for case in dict.fromkeys(cases)
    }
    results: dict[tuple[str, int], dict[str, list[float]]] = {c: {"latent": [], "image": []} for c in fns}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        noise = sampling.initial_noise(seed, len(prompts), (size // f, size // f), cfg.latent_channels)
        out = {c: jax.device_get(fn(pipe.params, text, uncond, noise, jnp.float32(args.cfg))) for c, fn in fns.items()}
        ref = out[cases[0]]
        for c in fns:
            results[c]["latent"].append(normwise(out[c].latent_BxhxwxC, ref.latent_BxhxwxC))
            results[c]["image"].append(normwise(out[c].images_BxHxWx3, ref.images_BxHxWx3))
    rows = [{"sampler": r, "steps": s, "nfe": evaluations(r, s), **results[r, s]} for r, s in dict.fromkeys(cases[1:])]
    print(
        f"Distance to the {args.reference_steps}-step Euler solution (normwise relative), run "
        f"{Path(args.workdir).name}: {len(prompts)} held-out prompts x {args.seeds} noise seeds, {size}x{size} px, "
        f"cfg {args.cfg}, shift {shift}; mean ± std over seeds ({time.perf_counter() - t0:.0f} s with compiles).\n"
    )
    print(markdown_table(rows))
    if args.check_reference:
        print(f"\nLast row: the reference's check ({2 * args.reference_steps} Euler steps); see the module docstring.")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
