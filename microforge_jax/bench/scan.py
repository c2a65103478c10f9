"""Selective-scan forms side by side, forward and forward+backward, plus a mock BiSSM train step.

    python -m microforge_jax.bench.scan [--repeats 5] [--quick]

`--quick` skips the per-form scan table. "before" columns run the previous graph in the same
process: `BiSSM(reference_graph=True)` (grouped `nn.Conv`s, autodiffed gathers) and the previous
sequential-scan backward (`scan._sequential_v1`). The last table is the real nano `Denoiser` train
step (fwd and `value_and_grad` of mean(v^2); batch 32, 8x8 latent, 16 fake 384-wide text tokens):
what the CPU default run pays per step.

Shapes are those the BiSSM hands the scan (both directions stacked on the batch axis, so the scan
batch is 2 x the model batch): nano (dim 128 -> inner 256, batch 32, 64 tokens or 128 for editing),
tiny (dim 256 -> inner 512, batch 8, 256 tokens). The mock step is 6 residual BiSSM blocks (dim 256,
batch 8, an 8x16 grid), fwd and fwd+bwd of a squared loss, next to the same step with the scan
replaced by its skip term (dense work only) and the dense FLOP count at the measured matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax.bench.machine import cpu_model
from microforge_jax.config import BackboneConfig
from microforge_jax.models import backbone as backbone_lib
from microforge_jax.models import scan as scan_lib
from microforge_jax.models import ssm

FORMS = ("sequential", "chunked", "associative")


def forms(backend: str | None = None) -> tuple[str, ...]:
    """The forms timed on `backend`: FORMS, plus "native" (the C++ kernel) on CPU, "pallas" elsewhere.

    On CPU the Pallas kernel runs in the Pallas interpreter, which exists for tests, not for timing.
    """
    return FORMS + (("native",) if (backend or jax.default_backend()) == "cpu" else ("pallas",))


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def _scan_inputs(bt: int, length: int, din: int, n: int):
    k = jax.random.split(jax.random.key(0), 4)
    u = jax.random.normal(k[0], (bt, length, din))
    delta = jax.nn.softplus(jax.random.normal(k[1], (bt, length, din)) - 4.0)
    A = -jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (din, 1))
    return (
        u,
        delta,
        A,
        jax.random.normal(k[2], (bt, length, n)),
        jax.random.normal(k[3], (bt, length, n)),
        jnp.ones(din),
    )


def bench_scan(bt: int, length: int, din: int, n: int, impl: str, chunk: int, repeats: int) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of one scan form."""
    args = _scan_inputs(bt, length, din, n)
    f = jax.jit(lambda *a: scan_lib.selective_scan(*a, impl=impl, chunk=chunk))
    g = jax.jit(
        jax.grad(lambda *a: jnp.sum(scan_lib.selective_scan(*a, impl=impl, chunk=chunk) ** 2), argnums=range(6))
    )
    return _time(f, *args, repeats=repeats), _time(g, *args, repeats=repeats)


@contextlib.contextmanager
def _graph(before: bool):
    """Traces the previous graph (reference BiSSM graph + the v1 scan backward) when `before`."""
    if not before:
        yield
        return
    with (
        mock.patch.object(scan_lib, "_sequential", scan_lib._sequential_v1),
        mock.patch.object(backbone_lib, "BiSSM", functools.partial(ssm.BiSSM, reference_graph=True)),
    ):
        yield


class _Stack(nn.Module):
    cfg: BackboneConfig
    grid: tuple[int, int]
    reference_graph: bool = False

    @nn.compact
    def __call__(self, x):
        for i in range(self.cfg.depth):
            mixer = ssm.BiSSM(self.cfg, layer_index=i, reference_graph=self.reference_graph)
            x = x + mixer(nn.LayerNorm()(x), self.grid)
        return x


def _mock_cfg(impl: str, chunk: int) -> BackboneConfig:
    return BackboneConfig(
        depth=6, dim=256, head_dim=64, ffn_expand=3, ssm_expand=2, ssm_state=16, dt_rank=0, conv_kernel=3,
        scan_impl=impl, scan_chunk=chunk, shared_attn_every=3, adaln_group_size=3, pos_embed="none",
        use_planner=False, mixer="bissm", use_shared_attn=False, use_dwconv=True, adaln="group",
        latent_channels=16, text_dim=384,
    )  # fmt: skip


def bench_mock_step(
    impl: str, chunk: int, repeats: int, dense_only: bool = False, before: bool = False
) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of 6 BiSSM blocks at dim 256, batch 8, 128 tokens."""
    model = _Stack(_mock_cfg(impl, chunk), (8, 16), reference_graph=before)
    x = jax.random.normal(jax.random.key(0), (8, 128, 256))
    params = model.init(jax.random.key(1), x)
    loss = lambda p, x: jnp.mean(model.apply(p, x) ** 2)
    skip = lambda u, delta, A, B, C, D, **kw: (u * D[:, None, :]).astype(u.dtype)
    f, g = jax.jit(loss), jax.jit(jax.grad(loss))
    # Traced (at the first call, inside `_time`) under the patches.
    with _graph(before), mock.patch.object(ssm, "selective_scan", skip) if dense_only else contextlib.nullcontext():
        return _time(f, params, x, repeats=repeats), _time(g, params, x, repeats=repeats)


def bench_nano_step(repeats: int, before: bool = False, grid: tuple[int, int] = (8, 8)) -> tuple[float, float]:
    """(fwd ms, value_and_grad ms) of the nano `Denoiser`: loss mean(v^2), batch 32, fake text."""
    from microforge_jax.config import ModelConfig, load_config
    from microforge_jax.models.denoiser import Text, build_denoiser

    cfg = ModelConfig.from_config(load_config("nano"))
    model = build_denoiser(cfg)
    k = jax.random.split(jax.random.key(0), 4)
    b, m = 32, 16
    z = jax.random.normal(k[0], (b, *grid, cfg.latent_channels))
    t = jax.random.uniform(k[1], (b,))
    tokens = jax.random.normal(k[2], (b, m, cfg.text.embed_dim))
    text = Text(tokens, jnp.ones((b, m), bool), tokens.mean(1))
    with _graph(before):
        params = model.init(jax.random.key(1), z, t, text)
        loss = lambda p: jnp.mean(model.apply(p, z, t, text)[0] ** 2)
        f, g = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
        return _time(f, params, repeats=repeats), _time(g, params, repeats=repeats)


def mock_step_flops() -> float:
    """Dense FLOPs of one fwd+bwd mock step (matmuls and convs; bwd = 2 x fwd)."""
    tokens, dim, inner, n, rank, depth = 8 * 128, 256, 512, 16, 16, 6
    macs = dim * 2 * inner + inner * dim + 2 * (inner * (rank + 2 * n) + rank * inner + 9 * inner)
    return 3 * 2 * macs * tokens * depth


def matmul_gflops(repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (1024, 1024))
    f = jax.jit(lambda a: a @ a)
    return 2 * 1024**3 / (_time(f, a, repeats=repeats) / 1e3) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="skip the per-form scan table")
    args = parser.parse_args(argv)
    print("| machine | jax | date | backend | auto scan |\n|---|---|---|---|---|")
    print(f"| nproc {os.cpu_count()}, {cpu_model()} | {jax.__version__} | {datetime.date.today()} "
          f"| {jax.default_backend()} | {scan_lib.auto_impl()} |\n")  # fmt: skip
    if not args.quick:
        _forms_table(args)
    _step_table(args)


def _forms_table(args) -> None:
    shapes = {
        "nano 8x8 (2x32, 64, 256, 16)": (64, 64, 256, 16),
        "nano edit 8x16 (2x32, 128, 256, 16)": (64, 128, 256, 16),
        "tiny 16x16 (2x8, 256, 512, 16)": (16, 256, 512, 16),
    }
    print("| shape | form | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for name, shape in shapes.items():
        for impl in forms():
            fwd, both = bench_scan(*shape, impl, args.chunk, args.repeats)
            print(f"| {name} | {impl} | {fwd:.1f} | {both:.1f} |", flush=True)
        with mock.patch.object(scan_lib, "_sequential", scan_lib._sequential_v1):
            fwd, both = bench_scan(*shape, "sequential", args.chunk, args.repeats)
        print(f"| {name} | sequential, before (v1 backward) | {fwd:.1f} | {both:.1f} |", flush=True)
    print()


def _step_table(args) -> None:
    rate = matmul_gflops(args.repeats)
    flops = mock_step_flops()
    print(f"matmul 1024^3: {rate:.0f} GFLOP/s; mock step dense FLOPs {flops / 1e9:.2f} G (fwd+bwd)\n")
    print("| step | fwd ms | fwd+bwd ms | fwd+bwd / dense-FLOP cost |\n|---|---|---|---|")
    cost = flops / rate / 1e6
    print(f"| mock: dense FLOPs at the matmul rate | {cost / 3:.1f} | {cost:.1f} | 1.0 |")
    rows = [
        ("mock: dense only (scan -> skip), before", dict(dense_only=True, before=True)),
        ("mock: dense only (scan -> skip), after", dict(dense_only=True)),
        ("mock: sequential, before", dict(before=True)),
        ("mock: sequential, after", dict()),
        ("mock: chunked, after", dict(impl="chunked")),
    ]
    for name, kw in rows:
        fwd, both = bench_mock_step(kw.pop("impl", "sequential"), args.chunk, args.repeats, **kw)
        print(f"| {name} | {fwd:.1f} | {both:.1f} | {both / cost:.1f} |", flush=True)
    for name, kw in [("before", dict(before=True)), ("after", dict())]:
        fwd, both = bench_nano_step(args.repeats, **kw)
        print(f"| nano Denoiser (batch 32, 8x8, auto scan), {name} | {fwd:.1f} | {both:.1f} | - |", flush=True)


if __name__ == "__main__":
    main()
