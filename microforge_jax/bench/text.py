"""Text encoder benchmark: load, compile and steady-state encoding of a batch of prompts.

    python -m microforge_jax.bench.text                      # MiniLM, 32 prompts, M=32 (nano/tiny)
    python -m microforge_jax.bench.text --max-length 77 --iters 50

Prints one markdown table row (with its header) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never touch the network

PROMPTS = [
    "a red circle on a white background",
    "two small green triangles above a large yellow hexagon",
    "an oil painting of a lighthouse in a storm",
    "Café au lait avec crème, photographie",
    "一只红色的猫坐在窗台上",
    "a blue square",
    "",
    "a minimalist logo, flat vector art",
]


def main(argv: list[str] | None = None) -> str:
    """Runs the benchmark and prints the markdown table.

    Args:
        argv: command-line arguments (None: sys.argv).

    Returns:
        The table row.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm", choices=["minilm", "bert", "clip", "simple"])
    parser.add_argument("--path", default="", help="a Hugging Face folder ('' = built-in MiniLM)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import transformers

    from microforge_jax.bench.machine import cpu_model
    from microforge_jax.config import TextConfig
    from microforge_jax.text import load_text_encoder

    t0 = time.perf_counter()
    cfg = TextConfig(encoder=args.encoder, path=args.path, embed_dim=384, max_length=args.max_length, simple_layers=2)
    encoder = load_text_encoder(cfg, dtype=jnp.dtype(args.dtype))
    load_s = time.perf_counter() - t0

    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    ids, mask = encoder.tokenize(prompts)
    t0 = time.perf_counter()
    compiled = jax.jit(encoder.apply).lower(encoder.params, ids, mask).compile()
    compile_s = time.perf_counter() - t0

    jax.block_until_ready(compiled(encoder.params, ids, mask))  # warm-up
    steps, ends = [], []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(encoder.params, ids, mask))
        steps.append(time.perf_counter() - t0)
    encoder.encode(prompts)  # compiles encode's own jit once
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(encoder.encode(prompts))
        ends.append(time.perf_counter() - t0)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak_dev = f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB" if "peak_bytes_in_use" in stats else "n/a"
    where = f"{dev.platform}: {cpu_model()} x{os.cpu_count()}" if dev.platform == "cpu" else dev.device_kind
    versions = f"jax {jax.__version__}, transformers {transformers.__version__}"
    header = (
        "| encoder | dtype | batch x M | device | load s | compile s | step ms (median of N) | encode ms incl. tokenize "
        "| peak RSS MiB | peak device mem | versions |\n|" + "---|" * 11
    )
    row = (
        f"| {encoder.name} ({sum(x.size for x in jax.tree.leaves(encoder.params)) / 1e6:.1f}M) | {args.dtype} "
        f"| {args.batch} x {encoder.max_length} | {where} | {load_s:.2f} | {compile_s:.2f} "
        f"| {1e3 * statistics.median(steps):.1f} (N={args.iters}) | {1e3 * statistics.median(ends):.1f} "
        f"| {rss_mb:.0f} | {peak_dev} | {versions} |"
    )
    print(header)
    print(row)
    return row


if __name__ == "__main__":
    main()
