"""Where a trained run loses shape: ShapesEval of generation started from real scenes at noise level t0.

    python scripts/shape_by_noise_level.py --workdir runs/nano [--num 128] [--t0 0,0.2,0.4,0.6,0.8,1]

Each held-out scene is rendered, VAE-encoded (posterior mode), noised to t0
(z = (1 - t0) z_src + t0 eps), then generated down to 0 with its own caption (guided Euler on the
linear grid scaled by t0, the sampler's planner carry) and decoded; ShapesEval reads the result
back. t0 = 0 is the VAE round trip (the read-back ceiling); t0 = 1 is generation from noise. The
level where a column falls from the first to the last value is where the model has to decide that
attribute (BENCHMARKS.md, "Where shape is decided"). ~2 minutes for nano on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from microforge_jax import flow, sampling  # noqa: E402
from microforge_jax.data.shapes import caption_for, render_scene, scene_for_index  # noqa: E402
from microforge_jax.eval import model_eval, shapes_eval  # noqa: E402
from microforge_jax.models.denoiser import build_denoiser  # noqa: E402
from microforge_jax.models.vae import build_vae  # noqa: E402
from microforge_jax.pipeline import MicroForgePipeline  # noqa: E402

COLUMNS = ("colour", "shape", "size", "position", "count", "single_colour_shape")


def make_run(pipe: MicroForgePipeline, text, uncond, steps: int, cfg: float):
    """jit(x_BxHxWx3 in [-1, 1], noise, t0) -> decoded images after `steps` guided Euler steps from t0."""
    mc = pipe.model_cfg
    den, vae = build_denoiser(mc), build_vae(mc)
    # The sampler's own unboxing (load_run gives bare trees or variables dicts).
    dvars, vvars = sampling._variables(pipe.params["denoiser"]), sampling._variables(pipe.params["vae"])
    text_n = sampling.stack_guidance(text, uncond)

    @jax.jit
    def run(x, noise, t0):
        b = x.shape[0]
        z_src = sampling.normalize_latent(vae.apply(vvars, x, method="encode").mode(), mc.vae)
        z = flow.interpolate(z_src, noise, jnp.full((b,), t0))
        ts = jnp.linspace(1.0, 0.0, steps + 1) * t0

        def denoise(z, t, plan, has_prev):
            return den.apply(
                dvars,
                jnp.concatenate([z, z]),
                jnp.full((2 * b,), t),
                text_n,
                prev_plan_BxKxD=plan,
                has_prev_B=None if plan is None else jnp.full((2 * b,), has_prev),
            )

        plan0 = jax.eval_shape(lambda z: denoise(z, 1.0, None, False)[1], z)
        plan0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), plan0)

        def body(carry, i):
            z, plan = carry
            v, plan = denoise(z, ts[i], plan, i > 0)
            v = flow.guidance(v[:b], v[b:], cfg)
            return (flow.euler_step(z, v, ts[i], ts[i + 1]), plan), None

        (z, _), _ = jax.lax.scan(body, (z, plan0), jnp.arange(steps))
        return jnp.clip(vae.apply(vvars, sampling.denormalize_latent(z, mc.vae), method="decode"), -1.0, 1.0)

    return run


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
    scenes = [scene_for_index(i, "heldout") for i in range(args.num)]
    captions = [
        caption_for(s, model_eval.FULL_TEMPLATES[i % len(model_eval.FULL_TEMPLATES)]) for i, s in enumerate(scenes)
    ]
    x = np.stack([render_scene(s, size) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    run = make_run(pipe, pipe.encode(captions), pipe.encode([""]), args.steps, args.cfg)
    f = pipe.model_cfg.vae.downsample_factor
    noise = jax.random.normal(jax.random.key(0), (args.num, size // f, size // f, pipe.model_cfg.latent_channels))
    print("| t0 | " + " | ".join(COLUMNS) + " |")
    print("|---:|" + "---:|" * len(COLUMNS))
    for t0 in levels:
        report = shapes_eval.evaluate(sampling.to_uint8(np.asarray(run(x, noise, jnp.float32(t0)))), scenes)
        print(f"| {t0:.2f} | " + " | ".join(f"{100 * report[k]:.1f}" for k in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
