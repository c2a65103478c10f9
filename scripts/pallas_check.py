"""GPU check of the fused Pallas scan: agreement with `sequential`, then timings against `associative`.

    python scripts/pallas_check.py [--forms associative,pallas] [--lengths 256,1024] [--sweep [8:32:2,...]]

(a) forward and all six gradients of `selective_scan(impl="pallas")` vs `impl="sequential"` at
Bt=8, L=256, Din=256, N=16 (max abs and norm-wise relative errors);
(b) forward and forward+backward (grad of sum(y^2) w.r.t. all inputs) at Bt=64, Din=768, N=16,
fp32, L in `--lengths`: jit, block_until_ready, median of 20 calls after a warm-up, one table.
`--sweep` adds pallas rows with other chunk:block_d:num_warps at the first length, to pick the
defaults. Each row catches and prints its own exception. Sized for ~90 s on one H100.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from microforge_jax.kernels import pallas_scan  # noqa: E402
from microforge_jax.models import scan as scan_lib  # noqa: E402

SWEEP = "16:32:4,8:16:1,8:64:4,4:32:2"  # chunk:block_d:num_warps


def inputs(bt: int, length: int, din: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((bt, length, din), np.float32)
    delta = np.log1p(np.exp(rng.standard_normal((bt, length, din), np.float32) - 4.0)).astype(np.float32)
    A = -np.broadcast_to(np.arange(1, n + 1, dtype=np.float32), (din, n)).copy()
    B = rng.standard_normal((bt, length, n), np.float32)
    C = rng.standard_normal((bt, length, n), np.float32)
    D = rng.standard_normal(din).astype(np.float32)
    return [jnp.asarray(x) for x in (u, delta, A, B, C, D)]


def scan_fn(form: str):
    """(u, delta, A, B, C, D) -> y for a form name or a ("pallas", chunk, block_d, num_warps) tuple."""
    if isinstance(form, tuple):
        _, chunk, block_d, num_warps = form
        kernel = functools.partial(pallas_scan.selective_scan_pallas, chunk=chunk, block_d=block_d, num_warps=num_warps)
        return lambda u, d, A, B, C, D: (kernel(u, d, jnp.swapaxes(A, 0, 1)[None], B, C) + u * D).astype(u.dtype)
    return lambda *a: scan_lib.selective_scan(*a, impl=form)


def check(bt=8, length=256, din=256, n=16) -> None:
    args = inputs(bt, length, din, n)
    w = jax.random.normal(jax.random.key(1), args[0].shape)
    print(f"(a) pallas vs sequential, Bt={bt} L={length} Din={din} N={n}, fp32")
    out = {}
    for form in ("sequential", "pallas"):
        f = scan_fn(form)
        y = jax.jit(f)(*args)
        g = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(w * jnp.sin(f(*a))), argnums=range(6)))(*args)
        out[form] = [y, *g]
    for name, a, b in zip(["y", "du", "ddelta", "dA", "dB", "dC", "dD"], out["pallas"], out["sequential"]):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        print(
            f"  {name:7s} max abs err {np.max(np.abs(a - b)):.3e}  rel {rel:.3e}  (max |ref| {np.max(np.abs(b)):.3e})"
        )


def median_ms(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def timings(forms, lengths, sweep: str = "", bt=64, din=768, n=16) -> None:
    print(f"\n(b) Bt={bt} Din={din} N={n}, fp32 inputs, median of 20 after a warm-up")
    print("| L | form | fwd ms | fwd+bwd ms |\n|---:|---|---:|---:|")
    cases = [(length, form) for length in lengths for form in forms]
    for cfg in filter(None, sweep.split(",")):
        cases.append((lengths[0], ("pallas", *map(int, cfg.split(":")))))
    for length, form in cases:
        name = form if isinstance(form, str) else "pallas chunk {} block_d {} warps {}".format(*form[1:])
        try:
            args = inputs(bt, length, din, n)
            f = scan_fn(form)
            fwd = median_ms(jax.jit(f), *args)
            both = median_ms(jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=range(6))), *args)
            print(f"| {length} | {name} | {fwd:.2f} | {both:.2f} |", flush=True)
        except Exception as e:  # one failing row must not stop the table
            print(f"| {length} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | |", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="associative,pallas")
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--sweep", nargs="?", const=SWEEP, default="", help="pallas chunk:block_d:num_warps,...")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    t0 = time.perf_counter()
    try:
        check()
    except Exception:
        traceback.print_exc()
    timings(args.forms.split(","), [int(x) for x in args.lengths.split(",")], args.sweep)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
