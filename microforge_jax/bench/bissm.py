"""The BiSSM layer and its selective scan against their hardware floors, JAX forms and the PyTorch mirror.

    python -m microforge_jax.bench.bissm [--bissm-lengths 64,256,1024,4096] [--bissm-batch 2]
        [--bissm-repeats 5] [--bissm-what layer,scan]
        [--bissm-forms native,sequential,chunked,associative,torch,torch-native]
        [--bissm-max-gb 8]

`--bissm-forms` also takes `pallas` (the fused kernel, `kernels/pallas_scan.py`); it runs on GPU only
(on CPU it would be the Pallas interpreter, so its rows are skipped there) and is not a default.

tiny's width (dim 256 -> inner 512, N = 16, dt rank 16, 3x3 depthwise conv), batch `--bissm-batch`
(2 by default; the scan sees 2 x batch rows, both directions stacked), L tokens on a square grid.
Forms: JAX `native` (the fused C++ kernel, `kernels/native_scan.py`: what `auto` picks on CPU),
`sequential` (`lax.scan`, the CPU fallback), `associative`, `chunked` (chunk 8), and the PyTorch mirror (`export/torch_model.py`: its eager form, a loop over tokens
in blocks with a hand-written backward; the static chunked form is only for export) and `torch-native`,
the mirror on the same C++ kernel as JAX's `native` (`export/torch_native_scan.py`, CPU; the one
`python -m microforge_jax.bench`'s sampling and train rows take when it is faster). Forward, and
forward + backward of sum(y^2) w.r.t. the inputs (and the layer's parameters).

Each time sits beside three floors measured in the same process, per backend:

  bytes floor = the minimum DRAM traffic / the copy bandwidth (`c + a` on 64 MiB arrays, looped)
  FLOP floor  = the hand-counted FLOPs / the f32 matmul rate (2048^3)
  exp floor   = the L x D x N exponentials / the exp rate (`exp` of a cache-resident 256 Ki-float
                block, repeated, the best of all threads and one thread; the rate over a 16 Mi-float
                array in DRAM is printed beside it (bound by bandwidth: a fused scan body beats it))

and `time / floor` uses the largest of the three. The counts (`scan_counts`, `layer_counts`):

* scan, forward: read u, delta (Bt L D), B, C (Bt L N), write y (Bt L D): 4 Bt L (3D + 2N) bytes;
  6N + 3 FLOPs per (row, token, channel) (decay product, a h + b, (delta u) B, C h accumulate;
  delta u, D u + y); Bt L D N exps.
* scan, forward + backward: the forward's traffic again in the backward, plus dy read and du,
  ddelta, dB, dC written: 4 Bt L (8D + 6N) bytes with nothing of size L D N stored; 6N + 3 forward
  plus 19N + 4 backward FLOPs (the backward rebuilds a and h); 2 Bt L D N exps (a recomputed;
  storing it instead costs 8 Bt L D N bytes). Forms that materialise L D N tensors move more:
  sequential stores h_{t-1} (write + read: 8 Bt L D N bytes) for the backward, associative builds
  a, b and h in both passes, the PyTorch mirror materialises Bt L T D N (T = 8) blocks.
* layer: the scan plus the dense work (in_proj, both directions' x_proj, dt_proj and 3x3 conv,
  out_proj; backward = 2 x forward) in the FLOP floor, and x read, out written and the weights
  read in the bytes floor.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax.kernels import native_scan
from microforge_jax.models.scan import auto_impl

DIM, EXPAND, STATE, CHUNK = 256, 2, 16, 8
JAX_FORMS = ("native", "sequential", "chunked", "associative", "pallas")
TORCH_FORMS = ("torch", "torch-native")  # the mirror's eager loop; the mirror on the C++ kernel
DEFAULT_FORMS = ("native", "sequential", "chunked", "associative", *TORCH_FORMS)
F32 = 4
RATE_N, MATMUL_N = 16 * 2**20, 2048  # the streaming arrays (64 MiB, past the caches) and the matmul side
EXP_BLOCK, EXP_REPS = 2**18, 50  # the exp rate: a 1 MiB cache-resident block, exp'd EXP_REPS times


# ----------------------------------------------------------------------------- hand counts


def scan_counts(bt: int, length: int, d: int, n: int, backward: bool) -> dict:
    """Minimum bytes, FLOPs and exps of the selective scan (fp32) over `bt` rows of `length` tokens."""
    rows = bt * length
    if backward:
        return {
            "bytes": F32 * rows * (8 * d + 6 * n),
            "flops": rows * d * ((6 * n + 3) + (19 * n + 4)),
            "exps": 2 * rows * d * n,
        }
    return {"bytes": F32 * rows * (3 * d + 2 * n), "flops": rows * d * (6 * n + 3), "exps": rows * d * n}


def layer_counts(batch: int, length: int, dim: int, inner: int, n: int, rank: int, k: int, backward: bool) -> dict:
    """Scan counts (both directions) plus the BiSSM's dense FLOPs and its x / out / weight traffic."""
    c = scan_counts(2 * batch, length, inner, n, backward)
    macs_per_token = dim * 2 * inner + inner * dim + 2 * (inner * (rank + 2 * n) + rank * inner + k * k * inner)
    dense = 2 * macs_per_token * batch * length
    weights = F32 * (macs_per_token + 2 * (inner + inner * n + inner + inner))  # + biases, A_log, D
    io = F32 * batch * length * dim * (2 if not backward else 4)  # x, out (+ dout, dx)
    return {
        "bytes": c["bytes"] + io + weights * (1 if not backward else 3),
        "flops": c["flops"] + dense * (3 if backward else 1),
        "exps": c["exps"],
        "dense_flops": dense * (3 if backward else 1),
    }


def materialised_bytes(form: str, bt: int, length: int, d: int, n: int, backward: bool) -> int:
    """Bytes of the form's largest L x D x N intermediates written + read once (0 = none of that size)."""
    full = F32 * bt * length * d * n
    if form == "sequential":
        return 2 * full if backward else 0  # h_{t-1} stored for the backward
    if form == "associative":
        return (3 if not backward else 8) * full  # a, b, h (fwd); + the backward's copies
    if form == "torch":  # the eager loop keeps one block of decays; the backward, every state (written, read)
        return 2 * full if backward else 0
    return 0  # native, chunked, pallas: chunk-start states only, L / T x D x N


def floors(counts: dict, rates: dict) -> dict:
    """Milliseconds of each floor at the measured rates."""
    return {
        "bytes_ms": 1e3 * counts["bytes"] / rates["bandwidth"],
        "flops_ms": 1e3 * counts["flops"] / rates["matmul"],
        "exp_ms": 1e3 * counts["exps"] / rates["exp"],
    }


# ----------------------------------------------------------------------------- timing


def _median_ms(fn, repeats: int, budget_s: float, stat=statistics.median) -> tuple[float, float]:
    """(first-call seconds incl. compile, median ms of up to `repeats` later calls within ~budget_s)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first < budget_s:
        fn()  # warm-up (a case slower than the budget counts its first call as the warm-up)
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (
        len(times) < (1 if first > budget_s else 2) or time.perf_counter() - start < budget_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, 1e3 * stat(times)


def _best_ms(fn, repeats: int) -> float:
    """Best of `repeats` calls: the rates are peaks (a floor must not exceed the time it bounds)."""
    return _median_ms(fn, max(repeats, 5), 2.0, stat=min)[1]


def jax_rates(repeats: int, inner: int = 10) -> dict:
    """bytes/s of `c + a`, f32 matmul FLOP/s and exp/s, jitted on the default device.

    The streaming ops repeat `inner` times inside one call (a `fori_loop` carrying c): a fresh
    64 MiB output per call would time the allocator's first-touch page faults, not DRAM.
    """
    n, small, reps, k = RATE_N, EXP_BLOCK, EXP_REPS, MATMUL_N
    a, c = jax.random.normal(jax.random.key(0), (2, n))
    loop = lambda body, k: jax.jit(lambda a, c: jax.lax.fori_loop(0, k, lambda i, c: body(a, c), c))
    add = loop(lambda a, c: c + a, inner)
    ex_dram, ex = loop(lambda a, c: jnp.exp(c - 1.0), inner), loop(lambda a, c: jnp.exp(c - 1.0), reps)
    m = jax.random.normal(jax.random.key(1), (k, k))
    mm = jax.jit(lambda x: x @ x)
    t_add = _best_ms(lambda: add(a, c).block_until_ready(), repeats) / inner
    t_mm = _best_ms(lambda: mm(m).block_until_ready(), repeats)
    t_dram = _best_ms(lambda: ex_dram(a, c).block_until_ready(), repeats) / inner
    t_exp = _best_ms(lambda: ex(a[:small], c[:small]).block_until_ready(), repeats) / reps
    return {
        "bandwidth": 3 * F32 * n / t_add * 1e3,
        "matmul": 2 * k**3 / t_mm * 1e3,
        "exp": max(small / t_exp, n / t_dram) * 1e3,
        "exp_dram": n / t_dram * 1e3,
    }


def torch_rates(repeats: int) -> dict:
    """The same three rates in PyTorch (add / exp into preallocated outputs), plus numpy's add."""
    import torch

    n, k = RATE_N, MATMUL_N
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    m = torch.randn(k, k)
    t_add = _best_ms(lambda: torch.add(a, b, out=c), repeats)
    t_mm = _best_ms(lambda: torch.mm(m, m), repeats)
    t_dram = _best_ms(lambda: torch.exp(a, out=c), repeats)
    sa, sc = a[:EXP_BLOCK].clone(), c[:EXP_BLOCK].clone()

    def exps():
        for _ in range(EXP_REPS):
            torch.exp(sa, out=sc)

    t_exp = _best_ms(exps, repeats) / EXP_REPS
    # Under CPU contention OpenMP's barriers can stall a small op 100x; one thread does not wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_exp = min(t_exp, _best_ms(exps, repeats) / EXP_REPS)
    finally:
        torch.set_num_threads(threads)
    na, nb, nc = a.numpy(), b.numpy(), c.numpy()
    t_np = _best_ms(lambda: np.add(na, nb, out=nc), repeats)
    return {
        "bandwidth": 3 * F32 * n / t_add * 1e3,
        "matmul": 2 * k**3 / t_mm * 1e3,
        "exp": max(EXP_BLOCK / t_exp, n / t_dram) * 1e3,
        "exp_dram": n / t_dram * 1e3,
        "numpy_bandwidth": 3 * F32 * n / t_np * 1e3,
    }


# ----------------------------------------------------------------------------- JAX cases


def _grid(length: int) -> tuple[int, int]:
    h = int(math.isqrt(length))
    while length % h:
        h -= 1
    return h, length // h


def _bb_cfg(impl: str):
    import dataclasses

    from microforge_jax.config import ModelConfig, load_config

    bb = ModelConfig.from_config(load_config("tiny")).backbone
    return dataclasses.replace(bb, dim=DIM, ssm_expand=EXPAND, ssm_state=STATE, scan_impl=impl, scan_chunk=CHUNK)


def scan_inputs(bt: int, length: int, d: int, n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Scan inputs as numpy (both backends get the same values): u, delta, A (bt, d, n), B, C, D (bt, d)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((bt, length, d), np.float32)
    delta = np.log1p(np.exp(rng.standard_normal((bt, length, d), np.float32) - 4.0)).astype(np.float32)
    A = -np.broadcast_to(np.arange(1, n + 1, dtype=np.float32), (bt, d, n)).copy()
    B = rng.standard_normal((bt, length, n), np.float32)
    C = rng.standard_normal((bt, length, n), np.float32)
    return u, delta, A, B, C, np.ones((bt, d), np.float32)


def jax_scan_case(form: str, inputs, backward: bool):
    from microforge_jax.models import scan as scan_lib

    args = [jnp.asarray(x) for x in inputs]
    f = lambda *a: scan_lib.selective_scan(*a, impl=form, chunk=CHUNK)
    if backward:
        g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4, 5)))
        return lambda: jax.block_until_ready(g(*args))
    fj = jax.jit(f)
    return lambda: jax.block_until_ready(fj(*args))


def jax_layer_case(form: str, batch: int, length: int, backward: bool):
    from microforge_jax.models.ssm import BiSSM

    grid = _grid(length)
    model = BiSSM(_bb_cfg(form))
    x = jax.random.normal(jax.random.key(0), (batch, length, DIM))
    params = jax.jit(lambda x: model.init(jax.random.key(1), x, grid))(x)
    if backward:
        g = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x, grid) ** 2), argnums=(0, 1)))
        return lambda: jax.block_until_ready(g(params, x))
    f = jax.jit(lambda p, x: model.apply(p, x, grid))
    return lambda: jax.block_until_ready(f(params, x))


# ----------------------------------------------------------------------------- PyTorch cases


def _torch_kernel(native: bool):
    """The mirror's scan: its eager loop, or the C++ kernel (`torch_native_scan`) when `native`."""
    from microforge_jax.export import torch_model

    if not native:
        return torch_model.selective_scan
    from microforge_jax.export import torch_native_scan

    return torch_native_scan.selective_scan


def torch_scan_case(inputs, backward: bool, native: bool = False):
    import torch

    scan = _torch_kernel(native)
    ts = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    if not backward:

        def run():
            with torch.no_grad():
                scan(*ts)

        return run
    ts = [t.requires_grad_(True) for t in ts]

    def run_bwd():
        for t in ts:
            t.grad = None
        (scan(*ts) ** 2).sum().backward()

    return run_bwd


def torch_layer_case(batch: int, length: int, backward: bool, native: bool = False):
    run = _torch_layer_case(batch, length, backward)
    if not native:
        return run
    from microforge_jax.export import torch_native_scan

    def run_native():  # the mirror's BiSSM reads its eager scan (`SCAN_KERNEL`) at call time
        with torch_native_scan.as_scan_kernel():
            run()

    return run_native


def _torch_layer_case(batch: int, length: int, backward: bool):
    import torch

    from microforge_jax.export import torch_model

    grid = _grid(length)
    bb = {"dim": DIM, "ssm_expand": EXPAND, "ssm_state": STATE, "dt_rank": 0, "use_dwconv": True}
    bb.update({"scan_chunk": CHUNK, "conv_kernel": 3})
    torch.manual_seed(0)
    layer = torch_model.BiSSM(bb, layer_index=0)
    with torch.no_grad():
        for p in ("fwd_", "bwd_"):  # Mamba's S4D-real init (the mirror's zeros give A = -1)
            getattr(layer, f"{p}A_log").copy_(torch.log(torch.arange(1, STATE + 1).float()).expand(DIM * EXPAND, STATE))
    x = torch.randn(batch, length, DIM)
    if not backward:

        def run():
            with torch.no_grad():
                layer(x, grid)

        return run
    x.requires_grad_(True)

    def run_bwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x, grid) ** 2).sum().backward()

    return run_bwd


# ----------------------------------------------------------------------------- rows


def estimated_gb(form: str, bt: int, length: int, d: int, n: int, backward: bool) -> float:
    """A rough upper estimate of the form's peak memory, to skip cases that would not fit."""
    full = F32 * bt * length * d * n
    # torch: at most a block of decays and states (fwd), every state plus a block's gradients (fwd+bwd).
    live = {"sequential": 1.5, "chunked": 0.2, "associative": 6.0, "torch": 1.0, "pallas": 0.1, "native": 0.1,
            "torch-native": 0.1}[form]  # fmt: skip
    return live * full * ((2.0 if form == "torch" else 2.5) if backward else 1.0) / 1e9


def _forms(text: str) -> str:
    """`--bissm-forms`: a comma-separated subset of JAX_FORMS + TORCH_FORMS (else a usage error)."""
    unknown = [f for f in text.split(",") if f and f not in JAX_FORMS + TORCH_FORMS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown form(s) {', '.join(unknown)}; forms are {', '.join(JAX_FORMS + TORCH_FORMS)}"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bissm-lengths", default="64,256,1024,4096", help="comma-separated token counts L")
    parser.add_argument("--bissm-batch", type=int, default=2, help="model batch (the scan sees 2x: both directions)")
    parser.add_argument("--bissm-repeats", type=int, default=5, help="timed calls per case (median), after a warm-up")
    parser.add_argument("--bissm-budget-s", type=float, default=4.0, help="stop repeating a case after this long")
    parser.add_argument("--bissm-what", default="layer,scan", help="layer, scan or both")
    parser.add_argument("--bissm-forms", default=",".join(DEFAULT_FORMS), type=_forms, help="forms to run")
    parser.add_argument("--bissm-modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    parser.add_argument("--bissm-max-gb", type=float, default=8.0, help="skip cases estimated to need more memory")


def _rates_note(name: str, r: dict) -> str:
    s = f"{name}: copy {r['bandwidth'] / 1e9:.1f} GB/s, matmul {r['matmul'] / 1e9:.0f} GFLOP/s, exp {r['exp'] / 1e9:.2f} G/s (from DRAM {r['exp_dram'] / 1e9:.2f})"
    if "numpy_bandwidth" in r:
        s += f" (numpy copy {r['numpy_bandwidth'] / 1e9:.1f} GB/s)"
    return s


def _case_row(what, length, mode, form, b, counts, rates) -> dict:
    backend = "torch" if form in TORCH_FORMS else "jax"
    fl = floors(counts, rates[backend])
    default = form == "torch" or form == auto_impl()  # what `auto` picks on this backend (the mirror: its loop)
    label = {"torch": "torch loop", "torch-native": "torch C++ scan"}.get(form, f"jax {form}")
    impl = label + (" [default]" if default else "")
    inner = DIM * EXPAND
    extra = materialised_bytes(form, 2 * b, length, inner, STATE, mode == "fwd+bwd")
    note = f"floors ms: bytes {fl['bytes_ms']:.2f}, flops {fl['flops_ms']:.2f}, exp {fl['exp_ms']:.2f}"
    if extra:
        ms = 1e3 * extra / rates[backend]["bandwidth"]
        note += f"; materialises L*D*N: +{extra / 1e6:.0f} MB traffic ({ms:.1f} ms)"
    return {
        "part": "bissm",
        "case": f"{what} L={length} B={b} {mode}",
        "impl": impl,
        "median_ms": None,
        "compile_s": None,
        "ratio": None,
        "note": note,
        "what": what,
        "length": length,
        "mode": mode,
        "form": form,
        "floors_ms": fl,
        "floor_ms": max(fl.values()),
    }


def rows(args) -> list[dict]:
    """Rates rows first, then one row per (what, L, mode, form) with its floors and time / floor.

    All PyTorch work runs first, then all JAX work: XLA's CPU thread pool keeps spinning for a
    moment after each call and, interleaved, slows PyTorch's multi-threaded small ops by up to 100x.
    """
    import torch

    repeats, budget = args.bissm_repeats, args.bissm_budget_s
    forms = [f for f in args.bissm_forms.split(",") if f]
    b, inner, n = args.bissm_batch, DIM * EXPAND, STATE
    rank = math.ceil(DIM / 16)
    rates = {}
    if set(forms) & set(TORCH_FORMS):
        rates["torch"] = torch_rates(repeats)
    cases = []  # (row, thunk building the timed function)
    for backend in ("torch", "jax"):
        if backend == "jax":
            rates["jax"] = jax_rates(repeats)
        for what in args.bissm_what.split(","):
            for length in (int(x) for x in args.bissm_lengths.split(",")):
                inputs = scan_inputs(2 * b, length, inner, n) if what == "scan" else None
                for mode in args.bissm_modes.split(","):
                    backward = mode == "fwd+bwd"
                    if what == "scan":
                        counts = scan_counts(2 * b, length, inner, n, backward)
                    else:
                        counts = layer_counts(b, length, DIM, inner, n, rank, 3, backward)
                    for form in forms:
                        if (form in TORCH_FORMS) != (backend == "torch"):
                            continue
                        row = _case_row(what, length, mode, form, b, counts, rates)
                        cases.append(row)
                        gb = estimated_gb(form, 2 * b, length, inner, n, backward)
                        if form == "pallas" and jax.default_backend() == "cpu":
                            row["note"] = "skipped: pallas runs in the (very slow) Pallas interpreter on CPU; "
                            row["note"] += _case_row(what, length, mode, form, b, counts, rates)["note"]
                            continue
                        if form in ("native", "torch-native") and jax.default_backend() != "cpu":
                            row["note"] = "skipped: the native kernel is CPU only; " + row["note"]
                            continue
                        if form in ("native", "torch-native") and not native_scan.available():
                            row["note"] = "skipped: the native kernel did not build; " + row["note"]
                            continue
                        if gb > args.bissm_max_gb:
                            row["note"] = f"skipped: ~{gb:.1f} GB estimated > --bissm-max-gb {args.bissm_max_gb:g}; "
                            row["note"] += _case_row(what, length, mode, form, b, counts, rates)["note"]
                            continue
                        if form in TORCH_FORMS:
                            native = form == "torch-native"
                            fn = torch_scan_case(inputs, backward, native) if what == "scan" else None
                            fn = fn or torch_layer_case(b, length, backward, native)
                        elif what == "scan":
                            fn = jax_scan_case(form, inputs, backward)
                        else:
                            fn = jax_layer_case(form, b, length, backward)
                        first, ms = _median_ms(fn, repeats, budget)
                        row.update(median_ms=ms, compile_s=first, ratio=f"{ms / row['floor_ms']:.1f}x floor")
                        del fn
    order = {f: i for i, f in enumerate(JAX_FORMS + TORCH_FORMS)}
    whats, lengths = args.bissm_what.split(","), [int(x) for x in args.bissm_lengths.split(",")]
    modes = args.bissm_modes.split(",")
    cases.sort(
        key=lambda r: (whats.index(r["what"]), lengths.index(r["length"]), modes.index(r["mode"]), order[r["form"]])
    )
    head = [
        {
            "part": "bissm",
            "case": f"rates ({backend})",
            "impl": backend,
            "median_ms": None,
            "compile_s": None,
            "ratio": None,
            "note": _rates_note(backend, r)
            + (f"; torch threads {torch.get_num_threads()}" if backend == "torch" else ""),
            "rates": r,
        }
        for backend, r in rates.items()
    ]
    return head + cases


def markdown(rows_: list[dict]) -> str:
    lines = [r["note"] for r in rows_ if "rates" in r]
    lines += [
        "",
        "| what | L | mode | impl | median ms | bytes floor ms | FLOP floor ms | exp floor ms | time / floor | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows_:
        if "rates" in r:
            continue
        fl = r["floors_ms"]
        ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        ratio = "-" if r["median_ms"] is None else f"{r['median_ms'] / r['floor_ms']:.1f}"
        note = r["note"].split("; ", 1)[1] if "; " in r["note"] else ""
        if r["note"].startswith("skipped"):
            note = "skipped (CPU)" if "interpreter" in r["note"] else "skipped (memory)"
        lines.append(
            f"| {r['what']} | {r['length']} | {r['mode']} | {r['impl']} | {ms} | {fl['bytes_ms']:.2f} | "
            f"{fl['flops_ms']:.2f} | {fl['exp_ms']:.2f} | {ratio} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from microforge_jax.bench.machine import header  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    print(header())
    print(f"dim {DIM} -> inner {DIM * EXPAND}, N {STATE}, batch {args.bissm_batch} (scan rows 2x), chunk {CHUNK}\n")
    print(markdown(rows(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
