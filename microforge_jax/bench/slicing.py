"""VAE slicing, measured: the whole batch in one VAE call against the slices `vae_slicing` picks.

    python -m microforge_jax.bench.slicing                           # tiny 256 px b8, nano 64 px b32
    python -m microforge_jax.bench.slicing --cases tiny:256:8,tiny:128:8 --repeats 9

For each case (config:side:batch), JAX (jitted) and PyTorch (the export mirror, eager, no grad)
encode and decode the batch both ways. The two ways are timed alternately, one call each in turn,
so a shared machine's drift hits both alike; medians after a warm-up. Prints a markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m microforge_jax.bench`

import argparse
import statistics
import time
from collections.abc import Callable

DEFAULT_CASES = "tiny:256:8,nano:64:32"


def alternate(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall ms of each of `fns`, called in turn `repeats` times after one warm-up call each."""
    for fn in fns:
        fn()
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, r in zip(fns, runs):
            t0 = time.perf_counter()
            fn()
            r.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(r) for r in runs]


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    """Parses "tiny:256:8,nano:64:32" into [("tiny", 256, 8), ("nano", 64, 32)]."""
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"a case is config:side:batch (e.g. tiny:256:8), got {item!r}")
        cases.append((parts[0], int(parts[1]), int(parts[2])))
    return cases


def case_rows(name: str, side: int, batch: int, repeats: int) -> list[str]:
    """Markdown rows for one case: JAX and torch, encode and decode, whole vs sliced."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from microforge_jax.bench.compare import redraw
    from microforge_jax.config import ModelConfig, load_config
    from microforge_jax.export import torch_model as tm
    from microforge_jax.models import vae as vae_lib

    config = load_config(name)
    cfg = ModelConfig.from_config(config)
    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    if side % f:
        raise ValueError(f"{name}'s VAE needs a side that is a multiple of {f}, got {side}")
    vae = vae_lib.build_vae(cfg)
    params = redraw(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, f, f, 3))), 1)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)
    size = vae_lib.auto_slice_size(image)
    z = rng.standard_normal((batch, side // f, side // f, c)).astype(np.float32)
    enc = lambda x: vae.apply(params, x, method=vae.encode).mean
    dec = lambda x: vae.apply(params, x, method=vae.decode)
    tvae = tm.DCVAE(config.model.to_dict()).eval()
    timg, tz = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(z).permute(0, 3, 1, 2)
    rows = []
    for what, fn, x, tfn, tx in (
        ("encode", enc, image, tvae.encode_sliced, timg),
        ("decode", dec, z, tvae.decode_sliced, tz.contiguous()),
    ):
        rows += _part_rows(f"{name} {side} px b{batch}", what, fn, jnp.asarray(x), tfn, tx, batch, size, repeats)
    return rows


def _part_rows(case, what, fn, x, torch_fn, torch_x, batch: int, size: int, repeats: int) -> list[str]:
    import jax
    import torch

    from microforge_jax.models import vae as vae_lib

    whole, sliced = jax.jit(fn), jax.jit(lambda a: vae_lib.map_slices(fn, a, size))
    j = alternate([lambda: jax.block_until_ready(whole(x)), lambda: jax.block_until_ready(sliced(x))], repeats)
    with torch.inference_mode():
        t = alternate([lambda: torch_fn(torch_x, batch), lambda: torch_fn(torch_x, size)], repeats)
    return [
        f"| {case} | {what} | {impl} | {a:.0f} | {b:.0f} ({size}) | {a / b:.2f}x |"
        for impl, (a, b) in (("JAX jit", j), ("torch eager", t))
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"config:side:batch, comma-separated ({DEFAULT_CASES})")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each way (default 7)")
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")

    from microforge_jax.bench.compare import setup_torch
    from microforge_jax.bench.machine import header

    setup_torch()
    lines = [
        "| case | part | impl | whole batch ms | sliced ms (images per call) | speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, side, batch in cases:
        try:
            lines += case_rows(name, side, batch, args.repeats)
        except ValueError as e:  # an unknown config, a side the VAE cannot take
            parser.exit(2, f"error: {e}\n")
    text = f"`python -m microforge_jax.bench.slicing --cases {args.cases} --repeats {args.repeats}`\n\n"
    text += header() + "\n\n" + "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
