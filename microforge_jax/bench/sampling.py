"""Sampling latency of the tiny config: the whole jitted sampler (scan + planner carry + CFG + VAE decode).

    python -m microforge_jax.bench.sampling [--size 256] [--steps 4] [--batches 1,8] [--repeats 5]

Random parameters (latency does not depend on their values), MiniLM-width fake text (384 wide,
`max_length` tokens), guidance on (2B rows through the denoiser). Compile time is measured apart
(ahead-of-time `lower().compile()`); the run time is the median of `--repeats` calls.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax import sampling
from microforge_jax.bench.machine import cpu_model
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import build_vae


def _fake_text(batch: int, length: int, width: int, seed: int) -> Text:
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), bool)
    mask[:, : min(8, length)] = True  # a short prompt, padded like a real tokenizer's output
    tokens = rng.standard_normal((batch, length, width)).astype(np.float32) * mask[..., None]
    return Text(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(tokens[:, :8].mean(1)))


def init_params(cfg: ModelConfig, size: int) -> dict:
    """Random denoiser and VAE parameters (jitted init, unboxed: bare trees as `load_run` returns them)."""
    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    z = jnp.zeros((1, size // f, size // f, c))
    text = _fake_text(1, cfg.text.max_length, cfg.backbone.text_dim, 0)
    k = cfg.planner.num_tokens
    den = build_denoiser(cfg)
    dinit = lambda: den.init(
        jax.random.key(0), z, jnp.ones(1), text, prev_plan_BxKxD=jnp.zeros((1, k, cfg.backbone.dim))
    )
    vinit = lambda: build_vae(cfg).init(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    return {"denoiser": nn.unbox(jax.jit(dinit)()["params"]), "vae": nn.unbox(jax.jit(vinit)()["params"])}


def bench(cfg: ModelConfig, params: dict, batch: int, size: int, steps: int, repeats: int) -> dict:
    """Compile seconds and median seconds per call of the guided sampler at one batch size."""
    f = cfg.vae.downsample_factor
    text = _fake_text(batch, cfg.text.max_length, cfg.backbone.text_dim, 1)
    uncond = _fake_text(1, cfg.text.max_length, cfg.backbone.text_dim, 2)
    noise = sampling.initial_noise(0, batch, (size // f, size // f), cfg.latent_channels)
    args = (params, text, uncond, noise, jnp.float32(4.0))
    fn = sampling.make_sampler(cfg, steps, guidance=True)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    return {"batch": batch, "compile_s": compile_s, "median_s": statistics.median(runs), "min_s": min(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    cfg = ModelConfig.from_config(load_config(args.config))
    params = init_params(cfg, args.size)
    rows = [bench(cfg, params, int(b), args.size, args.steps, args.repeats) for b in args.batches.split(",")]

    device = jax.devices()[0]
    print(
        f"Sampling latency, config {args.config}, {args.size}x{args.size} px, {args.steps} Euler steps, guidance on "
        f"(2B denoiser rows), VAE decode included; median of {args.repeats} runs after one warm-up."
    )
    print(
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), device {device.platform}/{device.device_kind}; "
        f"jax {jax.__version__}; {datetime.date.today().isoformat()}\n"
    )
    print("| batch | compile (s) | median per call (ms) | min per call (ms) | per image (ms) | images/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, med = r["batch"], r["median_s"]
        print(
            f"| {b} | {r['compile_s']:.1f} | {1e3 * med:.0f} | {1e3 * r['min_s']:.0f} | {1e3 * med / b:.0f} | "
            f"{b / med:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
