"""Where a trained run loses shape: ShapesEval of generation started from real scenes at noise level t0.

    python scripts/shape_by_noise_level.py --workdir runs/nano [--num 128] [--t0 0,0.2,0.4,0.6,0.8,1]

Each held-out scene is rendered, then generated from with its own caption by the pipeline's
image-to-image path (`MicroForgePipeline.generate(init_image=..., strength=t0)`: the scene's latent
noised to t0, z = (1 - t0) z_src + t0 eps, then guided Euler steps down to 0 on the time grid scaled
by t0, the planner carried as in sampling; the denoiser sees only the text) and decoded; ShapesEval
reads the result back. t0 = 0 is the VAE round trip (the read-back ceiling); t0 = 1 is generation
from noise. The level where a column falls from the first to the last value is where the model has
to decide that attribute (docs/experiments.md, "Where shape is decided"). ~2 minutes for nano on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from microforge_jax.data.shapes import render_scene  # noqa: E402
from microforge_jax.eval import model_eval, shapes_eval  # noqa: E402
from microforge_jax.pipeline import MicroForgePipeline, SampleError  # noqa: E402

COLUMNS = ("colour", "shape", "size", "position", "count", "single_colour_shape")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--num", type=int, default=128, help="held-out scenes")
    p.add_argument("--t0", default="0,0.2,0.4,0.6,0.8,1", help="comma-separated noise levels in [0, 1]")
    p.add_argument("--steps", type=int, default=16, help="Euler steps from t0 to 0")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    args = p.parse_args(argv)
    try:
        levels = [float(v) for v in args.t0.split(",")]
    except ValueError:
        print(f"error: --t0 must be comma-separated numbers, got {args.t0!r}", file=sys.stderr)
        return 2
    if not levels or any(not 0.0 <= t <= 1.0 for t in levels) or args.num < 1 or args.steps < 1:
        print("error: --t0 values must lie in [0, 1], --num and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        pipe = MicroForgePipeline.from_run(args.workdir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = int(pipe.config.get("image_size", 64))
    scenes, captions = model_eval.eval_prompts(args.num, "heldout")
    images = np.stack([render_scene(s, size) for s in scenes])
    print("| t0 | " + " | ".join(COLUMNS) + " |")
    print("|---:|" + "---:|" * len(COLUMNS))
    for t0 in levels:
        if t0 == 0.0:  # nothing to re-draw: the VAE round trip
            report = model_eval._vae_roundtrip(pipe, args.num, "heldout")["readback"]
        else:
            kw = dict(steps=args.steps, cfg=args.cfg, seed=0)
            try:
                if t0 < 1.0:
                    out = pipe.generate(captions, init_image=images, strength=t0, **kw)
                else:
                    out = pipe.generate(captions, **kw)
            except SampleError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            report = shapes_eval.evaluate(out, scenes)
        print(f"| {t0:.2f} | " + " | ".join(f"{100 * report[k]:.1f}" for k in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
