"""Accelerator rows: training MFU of the flow step and sampling throughput, in bf16 at 512 px.

    python -m microforge_jax.bench --parts accel [--accel-train small,base] [--accel-sample base]
        [--accel-size 512] [--accel-train-batch 32] [--accel-sample-batch 16] [--accel-steps 4]

* train: the real jitted `flow_train_step` (donated state, AdamW, clipping, EMA, the planner's
  self-conditioning pass) with compute dtype bf16 (fp32 parameters and optimizer state) on
  cached VAE posteriors (`train.flow.cache_latents`, the accelerator recipe: the frozen VAE's
  encode is not part of the step). MFU = 3 x the hand-counted denoiser forward FLOPs
  (`compare.denoiser_flops`: forward + backward, the usual 6ND convention; the no-grad planner
  pass and the optimizer are not counted) per second over the chip's dense bf16 peak. The peak
  is the datasheet figure where the chip is known (`PEAK_BF16`), and the row also gives the
  fraction of the bf16 matmul rate measured in the same run.
* sample: the guided sampler (`make_sampler`: `lax.scan` over the steps, the planner carried,
  CFG, the VAE decode) in bf16, images per second at one batch.

Both on whatever `jax.default_backend()` is; on a CPU the rows are still produced (small sizes
with `--accel-size`), but the goals are the GPU's.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from microforge_jax import sampling
from microforge_jax.bench import compare, train_step
from microforge_jax.bench.sampling import _fake_text
from microforge_jax.config import ModelConfig, load_config

# Dense bf16 peaks (FLOP/s) from the datasheets, matched against `device_kind` (first hit wins).
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)
MFU_GOAL = 0.35


def peak_bf16(kind: str) -> float | None:
    """The datasheet dense bf16 FLOP/s of a device kind, or None when unknown."""
    for name, value in PEAK_BF16:
        if name.lower() in kind.lower():
            return value
    return None


def bf16_matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n bf16 matmul (jitted, median)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    ms = compare.median_ms(lambda: jax.block_until_ready(f(a, b)), repeats)
    return 2 * n**3 / (ms / 1e3)


# Op-name patterns of `kernel_profile`'s summary line, first match wins. nvjet_*: cuBLAS's GEMM
# kernels on Hopper; ynn_*: XNNPACK's on a CPU. ("conv" alone would match XLA's "convert" fusions.)
OP_KINDS = (
    ("matmul", r"gemm|dot|cublas|nvjet|cutlass|xmma|matmul|convolution|cudnn|ynn_|onednn"),
    ("scan kernel", r"custom-call|custom_call|triton|pallas|selective_scan"),
    ("copy/transpose/flip", r"copy|transpose|gather|scatter|reverse|dynamic.update.slice"),
    ("reduce", r"reduce"),
)
_CONTAINERS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "while")  # a CPU's nesting


def op_kind(name: str) -> str:
    for kind, pattern in OP_KINDS:
        if re.search(pattern, name.lower()):
            return kind
    return "other elementwise"


def kernel_profile(run, steps: int = 3, top: int = 25) -> list[str]:
    """Device time of `steps` calls of `run`, grouped by XLA op (trailing `.N` stripped), per call.

    Read from the trace `jax.profiler.trace` writes (`jax.profiler.ProfileData`): on a GPU the
    device planes' "XLA Ops" line (HLO instruction names: fusions, GEMMs, custom calls such as
    the Pallas kernels); where a device plane has no such line, its stream lines (kernel names);
    on a CPU the host's thunks, leaving out the containers that nest them. Returns printable
    lines: the total and a split by kind of op (`OP_KINDS`), then the `top` groups by time.
    """
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                run()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(paths[0])
    total, count = collections.Counter(), collections.Counter()
    device = [p for p in data.planes if p.name.startswith("/device:")]
    names = []
    for plane in device or [p for p in data.planes if p.name == "/host:CPU"]:
        lines = list(plane.lines)
        names += [f"{plane.name}:{ln.name}" for ln in lines]
        ops = [ln for ln in lines if ln.name == "XLA Ops"] or [
            ln for ln in lines if ln.name.startswith("Stream") or (not device and ln.name != "python")
        ]
        for line in ops:
            for ev in line.events:
                if ev.duration_ns <= 0 or ev.name.startswith(_CONTAINERS):
                    continue
                key = re.sub(r"(\.\d+)+$", "", ev.name.lstrip("%"))
                total[key] += ev.duration_ns / steps
                count[key] += 1 / steps
    all_ms = sum(total.values()) / 1e6
    kinds = collections.Counter()
    for key, ns in total.items():
        kinds[op_kind(key)] += ns / 1e6
    out = [
        f"device op time {all_ms:.2f} ms per call, {sum(count.values()):.0f} ops in {len(total)} groups "
        f"(trace lines: {', '.join(names[:8])})",
        "by kind: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / max(all_ms, 1e-9):.0f}%)" for k, v in kinds.most_common()),
    ]
    for key, ns in total.most_common(top):
        out.append(f"{ns / 1e6:8.3f} ms {100 * ns / 1e6 / max(all_ms, 1e-9):5.1f}%  x{count[key]:5.0f}  {key[:90]}")
    return out


def _bf16_config(name: str, size: int, scan: str = "auto"):
    config = load_config(name, ["model.dtype=bfloat16", f"model.backbone.scan_impl={scan}"])
    config.image_size = size
    return config


def train_row(
    name: str, size: int, batch: int, repeats: int, peak: float | None, matmul: float, scan: str = "auto",
    profile: bool = False, hlo_dir: str = "",
) -> dict:  # fmt: skip
    """One bf16 flow step on cached posteriors with one scan form: median ms, compile s and MFU."""
    config = _bf16_config(name, size, scan)
    cfg = ModelConfig.from_config(config)
    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    params = compare.init_params(cfg, size, seed=20)
    step, state, batch_, rng, frozen = train_step.jax_flow_step(config, params, batch, size)
    del batch_["image"]
    hw = (batch, size // f, size // f, c)
    batch_["latent_mean"] = jax.random.normal(jax.random.key(7), hw, jnp.float32)
    batch_["latent_logvar"] = jnp.full(hw, -4.0, jnp.float32)
    run, compile_s = train_step.compiled_step(step, state, batch_, rng, frozen)
    ms = compare.median_ms(run, repeats)
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}_b{batch}_{scan}.hlo.txt"), "w") as fh:
            fh.write(run.compiled.as_text())
    if profile:
        for line in kernel_profile(run, top=40):
            print(f"[accel profile] {name} b{batch} {scan}: {line}", flush=True)
    den = compare.denoiser_flops(cfg, (size // f, size // f))
    flops = 3 * batch * (den["dense"] + den["scan"])
    rate = flops / (ms / 1e3)
    mfu = f"{100 * rate / peak:.1f}% MFU (goal >= {100 * MFU_GOAL:.0f}%)" if peak else "peak unknown"
    return compare.row(
        "accel", f"{name} {size}px b{batch} bf16 flow step", f"JAX jit (cached latents), scan {scan}", ms, compile_s, mfu,
        f"{flops / batch / 1e9:.1f} GFLOP per image fwd+bwd by hand (scan {3 * den['scan'] / 1e9:.2f}); "
        f"{rate / 1e12:.1f} TFLOP/s = {100 * rate / matmul:.0f}% of the measured bf16 matmul "
        f"({matmul / 1e12:.0f} TFLOP/s); {batch / ms * 1e3:.0f} images/s",
    )  # fmt: skip


def sample_row(name: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    """The guided bf16 sampler at one batch: images per second."""
    config = _bf16_config(name, size)
    cfg = ModelConfig.from_config(config)
    f, m, e = cfg.vae.downsample_factor, cfg.text.max_length, cfg.backbone.text_dim
    params = compare.init_params(cfg, size, seed=30)
    args = (
        params,
        _fake_text(batch, m, e, 1),
        _fake_text(1, m, e, 2),
        sampling.initial_noise(0, batch, (size // f, size // f), cfg.latent_channels),
        jnp.float32(4.0),
    )
    fn = sampling.make_sampler(cfg, steps, guidance=True)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    ms = compare.median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)
    fl = compare.sampler_flops(cfg, batch, size, steps)
    return compare.row(
        "accel", f"{name} {size}px b{batch} {steps} steps CFG bf16", "JAX jit sampler (scan + decode)", ms, compile_s,
        f"{batch / ms * 1e3:.1f} images/s",
        f"{ms / batch:.1f} ms per image; {fl['total'] / batch / 1e9:.0f} GFLOP per image by hand "
        f"(VAE decode {fl['vae_decode'] / batch / 1e9:.0f}); {fl['total'] / (ms / 1e3) / 1e12:.1f} TFLOP/s",
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accel-train", default="small,base", help="configs for the MFU rows ('' for none)")
    parser.add_argument("--accel-sample", default="base", help="configs for the sampling-throughput rows")
    parser.add_argument("--accel-size", type=int, default=512, help="image side in px")
    parser.add_argument("--accel-train-batch", default="32", help="flow-step batches, comma-separated")
    parser.add_argument("--accel-sample-batch", type=int, default=16, help="sampling batch")
    parser.add_argument("--accel-steps", type=int, default=4, help="guided Euler steps")
    parser.add_argument(
        "--accel-scan", default="auto", help="scan forms of the MFU rows, one row each (e.g. associative,pallas)"
    )
    parser.add_argument(
        "--accel-profile", action="store_true", help="print each MFU row's device time by XLA op (jax.profiler)"
    )
    parser.add_argument("--accel-hlo-dir", default="", help="write each MFU row's optimized HLO text here")


def rows(args) -> list[dict]:
    """Sampling-throughput rows, then MFU rows; a failing case is a row saying why, not a crash."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    peak = peak_bf16(kind)
    n = 8192 if jax.default_backend() != "cpu" else 1024
    matmul = bf16_matmul_rate(n, max(3, args.repeats))
    print(
        f"[accel] {kind}: measured bf16 matmul {matmul / 1e12:.1f} TFLOP/s"
        + (f", datasheet peak {peak / 1e12:.0f}" if peak else ", datasheet peak unknown"),
        flush=True,
    )
    out = [compare.row("accel", kind, f"bf16 matmul ({n}^3)", None, None, f"{matmul / 1e12:.0f} TFLOP/s",
                       f"datasheet dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")]  # fmt: skip
    jobs: list[tuple[str, ...]] = [
        ("sample", n) for n in args.accel_sample.split(",") if n
    ]  # the cheaper compiles first
    scans = [s for s in getattr(args, "accel_scan", "auto").split(",") if s]
    batches = [int(b) for b in str(args.accel_train_batch).split(",") if b]
    jobs += [("train", n, s, b) for n in args.accel_train.split(",") if n for b in batches for s in scans]
    profile = getattr(args, "accel_profile", False)
    for what, name, *rest in jobs:
        print(f"[accel] {what} {name} {' '.join(map(str, rest))}...", flush=True)
        try:
            if what == "train":
                scan, batch = rest
                r = train_row(
                    name, args.accel_size, batch, args.repeats, peak, matmul, scan, profile,
                    getattr(args, "accel_hlo_dir", ""),
                )  # fmt: skip
            else:
                r = sample_row(name, args.accel_size, args.accel_sample_batch, args.accel_steps, args.repeats)
        except Exception as exc:  # noqa: BLE001 - one failed case (out of memory, say) is a row, not a crash
            r = compare.row("accel", f"{name} {args.accel_size}px", what, note=f"failed: {compare._first_line(exc)}")
        out.append(r)
    return out
