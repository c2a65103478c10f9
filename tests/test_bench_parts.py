"""The BiSSM floor counts, the benchmark modules' `rows()`, and the tiled VAE decode."""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microforge_jax.bench import bissm, memory
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models import vae as vae_lib


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- floor counts


def test_scan_counts_follow_the_hand_formulas():
    bt, length, d, n = 2, 3, 4, 5
    fwd = bissm.scan_counts(bt, length, d, n, backward=False)
    assert fwd == {"bytes": 4 * 2 * 3 * (3 * 4 + 2 * 5), "flops": 2 * 3 * 4 * (6 * 5 + 3), "exps": 2 * 3 * 4 * 5}
    both = bissm.scan_counts(bt, length, d, n, backward=True)
    assert both == {
        "bytes": 4 * 2 * 3 * (8 * 4 + 6 * 5),
        "flops": 2 * 3 * 4 * ((6 * 5 + 3) + (19 * 5 + 4)),
        "exps": 2 * 2 * 3 * 4 * 5,
    }
    # The forward bytes are exactly the scan's inputs read (u, delta, B, C) and its output written.
    from microforge_jax.models.scan import selective_scan

    args = [jnp.asarray(x) for x in bissm.scan_inputs(bt, length, d, n)]
    out = jax.eval_shape(lambda *a: selective_scan(*a, impl="sequential"), *args)
    io = sum(x.size * 4 for x in (args[0], args[1], args[3], args[4])) + out.size * 4
    assert fwd["bytes"] == io


def test_layer_counts_add_the_dense_work_and_floors_divide_by_rates():
    b, length, dim, inner, n, rank, k = 1, 4, 8, 16, 2, 1, 3
    c = bissm.layer_counts(b, length, dim, inner, n, rank, k, backward=False)
    macs = dim * 2 * inner + inner * dim + 2 * (inner * (rank + 2 * n) + rank * inner + k * k * inner)
    assert c["dense_flops"] == 2 * macs * b * length
    assert c["flops"] == bissm.scan_counts(2 * b, length, inner, n, False)["flops"] + 2 * macs * b * length
    assert bissm.layer_counts(b, length, dim, inner, n, rank, k, backward=True)["dense_flops"] == 3 * c["dense_flops"]
    fl = bissm.floors({"bytes": 2e9, "flops": 3e9, "exps": 4e9}, {"bandwidth": 1e9, "matmul": 1e9, "exp": 2e9})
    assert fl == {"bytes_ms": 2000.0, "flops_ms": 3000.0, "exp_ms": 2000.0}
    assert bissm.materialised_bytes("chunked", 4, 64, 8, 2, True) == 0
    assert bissm.materialised_bytes("sequential", 4, 64, 8, 2, True) == 2 * 4 * 4 * 64 * 8 * 2


# ----------------------------------------------------------------------------- rows()


def test_bissm_rows_run_on_a_tiny_case(monkeypatch):
    for name, value in [("EXP_REPS", 2), ("EXP_BLOCK", 2**12), ("RATE_N", 2**16), ("MATMUL_N", 64)]:
        monkeypatch.setattr(bissm, name, value)
    args = _args(
        bissm,
        ["--bissm-lengths", "16", "--bissm-batch", "1", "--bissm-repeats", "1", "--bissm-budget-s", "0"]
        + ["--bissm-forms", "sequential,torch,torch-native", "--bissm-modes", "fwd,fwd+bwd", "--bissm-what", "scan"],
    )
    rows = bissm.rows(args)
    keys = {"part", "case", "impl", "median_ms", "compile_s", "ratio", "note"}
    assert all(keys <= set(r) for r in rows)
    timed = [r for r in rows if r["median_ms"] is not None]
    assert len(timed) == 3 * 2 and all(r["median_ms"] > 0 and r["ratio"].endswith("x floor") for r in timed)
    # 8 fake devices: `auto` keeps lax.scan for JAX; the mirror's default is its loop, the C++ form beside it.
    assert {r["impl"] for r in timed} == {"jax sequential [default]", "torch loop [default]", "torch C++ scan"}
    assert "| scan | 16 | fwd |" in bissm.markdown(rows)


def test_bissm_layer_case_runs_the_mirror_on_the_cpp_kernel(monkeypatch):
    from microforge_jax.export import torch_model, torch_native_scan

    calls = []
    real = torch_native_scan.selective_scan
    monkeypatch.setattr(torch_native_scan, "selective_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    bissm.torch_layer_case(1, 16, backward=True, native=True)()
    assert calls == [1] and torch_model.SCAN_KERNEL is None  # used inside the call, restored after it
    bissm.torch_layer_case(1, 16, backward=False, native=False)()
    assert calls == [1]  # the loop form does not touch the kernel


def test_bissm_unknown_form_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _args(bissm, ["--bissm-forms", "native,bogus"])
    assert e.value.code == 2 and "unknown form(s) bogus" in capsys.readouterr().err


def test_memory_rows_run_on_a_tiny_case():
    argv = ["--memory-configs", "nano", "--memory-size", "64", "--memory-steps", "1", "--memory-vae-tile", "0,16"]
    rows = memory.rows(_args(memory, argv))
    assert [r["impl"] for r in rows] == ["untiled decode"]  # a tile covering the 16x16 latent: the same graph
    for r in rows:
        assert r["part"] == "memory" and r["median_ms"] is None and r["peak_mb"] > r["argument_mb"] > 0
    assert "| nano 64px" in memory.markdown(rows)


# ----------------------------------------------------------------------------- tiled decode


def test_tile_starts_and_weights_cover_the_latent():
    assert vae_lib.tile_starts(8, 8, 2) == [0] and vae_lib.tile_starts(8, 16, 2) == [0]
    for size, tile, overlap in [(16, 8, 2), (16, 6, 2), (10, 4, 1), (9, 8, 2)]:
        starts = vae_lib.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        w, total = vae_lib.blend_weights(starts, tile, size, 4)
        assert w.shape == (len(starts), tile * 4) and (w > 0).all() and (total > 0).all()


class _LocalDecoder(nn.Module):
    """A spatially local stand-in for the VAE decoder: per-cell dense -> pixel shuffle (factor 4)."""

    @nn.compact
    def __call__(self, z):
        return vae_lib.pixel_shuffle(nn.Dense(3 * 16)(z), 4)

    def decode(self, z):
        return self(z)


def test_tiled_decode_of_a_local_decoder_is_exact_away_from_overlaps():
    model = _LocalDecoder()
    z = jax.random.normal(jax.random.key(0), (2, 10, 7, 5))
    variables = model.init(jax.random.key(1), z)
    full = np.asarray(model.apply(variables, z, method="decode"))
    tiled = np.asarray(jax.jit(lambda v, z: vae_lib.decode_tiled(model, v, z, 4, overlap=1))(variables, z))
    assert full.std() > 0
    rows, cols = vae_lib.tile_starts(10, 4, 1), vae_lib.tile_starts(7, 4, 1)
    seam = lambda starts, size: np.repeat(np.bincount(
        np.concatenate([np.arange(s, s + 4) for s in starts]), minlength=size) > 1, 4)  # fmt: skip
    r_seam, c_seam = seam(rows, 10), seam(cols, 7)
    assert r_seam.any() and c_seam.any()
    away = ~(r_seam[:, None] | c_seam[None, :])
    np.testing.assert_array_equal(tiled[:, away], full[:, away])
    np.testing.assert_allclose(tiled, full, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def nano_vae(redraw):
    cfg = ModelConfig.from_config(load_config("nano"))
    model = vae_lib.build_vae(cfg)
    f = cfg.vae.downsample_factor
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, f, f, 3)))["params"]
    return cfg, model, {"params": redraw(params, seed=3)}


def test_tiled_decode_of_the_vae(nano_vae, relerr):
    cfg, model, variables = nano_vae
    z = jax.random.normal(jax.random.key(2), (1, 8, 8, cfg.latent_channels))
    full = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, z)
    assert float(full.std()) > 0
    # A tile covering the latent is the untiled graph itself: exactly equal.
    whole = jax.jit(lambda v, z: vae_lib.decode_tiled(model, v, z, 8))(variables, z)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(full))
    # Smaller tiles: per-tile GroupNorm statistics and border padding shift pixels a little.
    tiled = jax.jit(lambda v, z: vae_lib.decode_tiled(model, v, z, 6, overlap=2))(variables, z)
    assert tiled.shape == full.shape and bool(jnp.all(jnp.isfinite(tiled)))
    assert relerr(tiled, full) < 0.25


def test_sampler_vae_tile_option(nano_vae):
    from microforge_jax import sampling

    cfg, _, _ = nano_vae
    calls = []

    class Recorder(vae_lib.DCVAE):
        def decode(self, z):
            calls.append(z.shape[1:3])
            return super().decode(z)

    params = memory.abstract_params(cfg, 8 * cfg.vae.downsample_factor, dtype=jnp.float32)
    text = memory.abstract_text(cfg, 1)
    z = jax.ShapeDtypeStruct((1, 8, 8, cfg.latent_channels), jnp.float32)
    for tile, decoded in [(0, (8, 8)), (4, (4, 4))]:
        calls.clear()
        fn = sampling.make_sampler(cfg, 1, guidance=False, vae=Recorder(cfg.vae), vae_tile=tile)
        out = jax.eval_shape(lambda p, t, z, fn=fn: fn(p, t, None, z, 1.0), params, text, z)
        f = cfg.vae.downsample_factor
        assert out.images_BxHxWx3.shape == (1, 8 * f, 8 * f, 3)
        assert calls and set(calls) == {decoded}


def test_low_memory_sampler_same_images_lower_peak():
    """`low_memory=True` compiles the same computation (bit-identical images) to a lower peak with
    bf16 weights (the fp32 weight converts stay inside the step loop)."""
    import dataclasses

    from microforge_jax import sampling
    from microforge_jax.bench.compare import init_params
    from microforge_jax.bench.sampling import _fake_text

    cfg = ModelConfig.from_config(load_config("nano"))
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    size, f = 64, cfg.vae.downsample_factor
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, size))
    m, e = cfg.text.max_length, cfg.backbone.text_dim
    noise = sampling.initial_noise(0, 1, (size // f, size // f), cfg.latent_channels)
    args = (params, _fake_text(1, m, e, 1), _fake_text(1, m, e, 2), noise, jnp.float32(3.0))
    images, peaks = {}, {}
    for low in (False, True):
        compiled = sampling.make_sampler(cfg, 2, low_memory=low).lower(*args).compile()
        ma = compiled.memory_analysis()
        peaks[low] = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
        images[low] = np.asarray(compiled(*args).images_BxHxWx3, np.float32)
    assert images[False].std() > 0.05
    np.testing.assert_array_equal(images[True], images[False])
    assert peaks[True] < peaks[False], peaks


# ----------------------------------------------------------------------------- accel (GPU rows)


def test_accel_peak_table_matches_device_kinds():
    from microforge_jax.bench import accel

    assert accel.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert accel.peak_bf16("NVIDIA H100 PCIe") == 756e12  # the PCIe card is listed before the SXM match
    assert accel.peak_bf16("NVIDIA A100-SXM4-40GB") == 312e12
    assert accel.peak_bf16("TPU v5 lite") == 197e12
    assert accel.peak_bf16("cpu") is None


def test_accel_rows_give_images_per_second_from_the_timing(monkeypatch):
    from microforge_jax.bench import accel, compare

    monkeypatch.setattr(compare, "median_ms", lambda fn, repeats: (fn(), 50.0)[1])  # the call runs; 50 ms
    args = _args(accel, ["--accel-train", "", "--accel-sample", "nano", "--accel-size", "32",
                         "--accel-sample-batch", "2", "--accel-steps", "1"])  # fmt: skip
    args.repeats = 1
    rows = accel.rows(args)
    assert [r["impl"] for r in rows] == ["bf16 matmul (1024^3)", "JAX jit sampler (scan + decode)"]
    assert rows[1]["median_ms"] == 50.0 and rows[1]["ratio"] == "40.0 images/s"  # 2 images / 50 ms


def test_accel_train_rows_one_per_config_batch_and_scan_form(monkeypatch):
    from microforge_jax.bench import accel, compare

    calls = []
    monkeypatch.setattr(accel, "bf16_matmul_rate", lambda n, repeats: 1e12)

    def fake_row(name, size, batch, repeats, peak, matmul, scan, profile, hlo_dir):
        calls.append((name, batch, scan, profile))
        return compare.row("accel", name, scan)

    monkeypatch.setattr(accel, "train_row", fake_row)
    args = _args(accel, ["--accel-train", "tiny,small", "--accel-sample", "", "--accel-scan", "associative,pallas",
                         "--accel-train-batch", "8,32"])  # fmt: skip
    args.repeats = 1
    accel.rows(args)
    assert calls == [
        (name, batch, scan, False)
        for name in ("tiny", "small")
        for batch in (8, 32)
        for scan in ("associative", "pallas")
    ]


def test_kernel_profile_groups_the_traced_ops():
    import jax
    import jax.numpy as jnp

    from microforge_jax.bench import accel

    assert accel.op_kind("gemm_fusion_dot_1194") == "matmul"
    assert accel.op_kind("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT") == "matmul"  # cuBLAS on Hopper
    assert accel.op_kind("loop_add_multiply_fusion") == "other elementwise"
    assert accel.op_kind("selective_scan_bwd") == "scan kernel"
    assert accel.op_kind("input_convert_reduce_fusion_26") == "reduce"
    assert accel.op_kind("loop_transpose_fusion") == "copy/transpose/flip"
    assert accel.op_kind("loop_convert_reverse_slice_fusion_11") == "copy/transpose/flip"

    f = jax.jit(lambda a: jnp.tanh(a @ a).sum(0))
    a = jax.random.normal(jax.random.key(0), (256, 256))
    lines = accel.kernel_profile(lambda: jax.block_until_ready(f(a)), steps=2, top=4)
    total = float(lines[0].split("device op time ")[1].split(" ms")[0])
    assert total > 0 and lines[1].startswith("by kind: ")
    groups = [float(line.split(" ms")[0]) for line in lines[2:]]
    assert 1 <= len(groups) <= 4 and groups == sorted(groups, reverse=True)
    assert sum(groups) <= total * 1.0001


def test_slicing_bench_times_both_ways_and_rejects_bad_cases(capsys):
    from microforge_jax.bench import slicing

    assert slicing.parse_cases("tiny:256:8, nano:64:32") == [("tiny", 256, 8), ("nano", 64, 32)]
    text = slicing.main(["--cases", "nano:16:2", "--repeats", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| nano 16 px b2")]
    assert [r.split(" | ")[1:3] for r in rows] == [
        ["encode", "JAX jit"],
        ["encode", "torch eager"],
        ["decode", "JAX jit"],
        ["decode", "torch eager"],
    ]
    for bad, message in (("nano:18:2", "multiple of 4"), ("nano:16", "config:side:batch")):
        with pytest.raises(SystemExit) as exc:
            slicing.main(["--cases", bad])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
