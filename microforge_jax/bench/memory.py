"""Peak memory of the whole sampler (4 guided steps + VAE decode) from XLA's `memory_analysis()`.

    python -m microforge_jax.bench.memory [--memory-configs tiny,small,base] [--memory-size 512]
        [--memory-vae-tile 0,8]

Nothing is allocated: parameters, text and noise are `jax.ShapeDtypeStruct`s (weights in bf16,
compute dtype bf16), the sampler is built as `bench/sampling.py` builds it (`make_sampler`,
guidance on, batch 1) and only lowered and compiled. The peak is the compiled function's
temp + argument + output bytes (CPU devices report no live allocator statistics), next to the
seed's figures (76 / 308 / 530 MB for tiny / small / base at 512 px). `--memory-vae-tile` adds rows
for the tiled VAE decode (`vae_tile` latent cells per tile; 0 = one decode of the whole latent),
`--memory-low-memory` rows compiled with `sampling.LOW_MEMORY_COMPILER_OPTIONS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax import sampling
from microforge_jax.bench.machine import header
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import build_vae

SEED_MB = {"tiny": 76, "small": 308, "base": 530}
MB = 1e6


def abstract_params(cfg: ModelConfig, size: int, dtype=jnp.bfloat16) -> dict:
    """Shapes of the denoiser and VAE parameters (bare trees) in `dtype`, from `jax.eval_shape`."""
    f, c, k = cfg.vae.downsample_factor, cfg.latent_channels, cfg.planner.num_tokens
    z = jax.ShapeDtypeStruct((1, size // f, size // f, c), jnp.float32)
    text = abstract_text(cfg, 1)
    plan = jax.ShapeDtypeStruct((1, k, cfg.backbone.dim), jnp.float32)
    den, vae = build_denoiser(cfg), build_vae(cfg)
    img = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    dshape = jax.eval_shape(
        lambda z, t, text, p: den.init(jax.random.key(0), z, t, text, prev_plan_BxKxD=p),
        z,
        jax.ShapeDtypeStruct((1,), jnp.float32),
        text,
        plan,
    )
    vshape = jax.eval_shape(lambda x: build_vae(cfg).init(jax.random.key(1), x), img)
    del vae
    cast = lambda s: jax.ShapeDtypeStruct(s.shape, dtype)
    return {
        "denoiser": jax.tree.map(cast, nn.unbox(dshape["params"])),
        "vae": jax.tree.map(cast, nn.unbox(vshape["params"])),
    }


def abstract_text(cfg: ModelConfig, batch: int) -> Text:
    m, w = cfg.text.max_length, cfg.backbone.text_dim
    return Text(
        jax.ShapeDtypeStruct((batch, m, w), jnp.float32),
        jax.ShapeDtypeStruct((batch, m), jnp.bool_),
        jax.ShapeDtypeStruct((batch, w), jnp.float32),
    )


def bf16_config(name: str) -> ModelConfig:
    """The config's model section with bf16 compute and bf16 weights."""
    cfg = ModelConfig.from_config(load_config(name))
    return dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")


def sampler_memory(
    cfg: ModelConfig, size: int, steps: int = 4, batch: int = 1, vae_tile: int = 0, low_memory: bool = False
) -> dict:
    """Compiles the guided sampler on abstract inputs and returns its `memory_analysis()` in bytes."""
    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    params = abstract_params(cfg, size)
    args = (
        params,
        abstract_text(cfg, batch),
        abstract_text(cfg, 1),
        jax.ShapeDtypeStruct((batch, size // f, size // f, c), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    fn = sampling.make_sampler(cfg, steps, guidance=True, vae_tile=vae_tile, low_memory=low_memory)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    out = {
        "temp": ma.temp_size_in_bytes,
        "argument": ma.argument_size_in_bytes,
        "output": ma.output_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
        "generated_code": ma.generated_code_size_in_bytes,
        "compile_s": compile_s,
    }
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    out["param_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return out


def vae_decode_memory(cfg: ModelConfig, size: int, vae_tile: int = 0, low_memory: bool = False) -> dict:
    """`memory_analysis()` of the VAE decode alone (batch 1), to locate the sampler's peak."""
    from microforge_jax.models.vae import decode_tiled

    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    vparams = abstract_params(cfg, size)["vae"]
    vae = build_vae(cfg)
    z = jax.ShapeDtypeStruct((1, size // f, size // f, c), jnp.float32)
    options = dict(sampling.LOW_MEMORY_COMPILER_OPTIONS) if low_memory else None
    fn = jax.jit(lambda p, z: decode_tiled(vae, {"params": p}, z, vae_tile), compiler_options=options)
    ma = fn.lower(vparams, z).compile().memory_analysis()
    return {"temp": ma.temp_size_in_bytes, "argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-configs", default="tiny,small,base", help="comma-separated config names")
    parser.add_argument("--memory-size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--memory-steps", type=int, default=4, help="guided Euler steps")
    parser.add_argument(
        "--memory-vae-tile", default="0,8", help="comma-separated VAE tile sizes in latent cells (0 = untiled)"
    )
    parser.add_argument("--memory-decode-only", action="store_true", help="also report the VAE decode alone")
    parser.add_argument(
        "--memory-low-memory", action="store_true", help="also compile with sampling.LOW_MEMORY_COMPILER_OPTIONS"
    )


def rows(args) -> list[dict]:
    """One row per (config, vae_tile): peak MB of the compiled sampler against the seed's figure."""
    out = []
    tiles = [int(t) for t in str(args.memory_vae_tile).split(",") if t != ""]
    for name in args.memory_configs.split(","):
        cfg = bf16_config(name)
        latent = args.memory_size // cfg.vae.downsample_factor
        modes = (False, True) if args.memory_low_memory else (False,)
        for tile, low in ((t, lm) for t in tiles for lm in modes):
            if tile and tile >= latent:
                continue  # one tile covers the latent: the untiled graph
            m = sampler_memory(cfg, args.memory_size, args.memory_steps, vae_tile=tile, low_memory=low)
            seed = SEED_MB.get(name)
            note = (
                f"peak {m['peak'] / MB:.1f} MB = temp {m['temp'] / MB:.1f} + args {m['argument'] / MB:.1f} "
                f"+ out {m['output'] / MB:.1f}; bf16 params {m['param_bytes'] / MB:.1f} MB"
            )
            if args.memory_decode_only:
                d = vae_decode_memory(cfg, args.memory_size, tile, low)
                note += f"; VAE decode alone: temp {d['temp'] / MB:.1f} MB"
            row = {
                "part": "memory",
                "case": f"{name} {args.memory_size}px b1 {args.memory_steps} steps CFG",
                "impl": (f"vae_tile={tile}" if tile else "untiled decode") + (", low_memory" if low else ""),
                "median_ms": None,
                "compile_s": m["compile_s"],
                "ratio": f"{m['peak'] / MB / seed:.2f}x seed ({seed} MB)" if seed else None,
                "note": note,
                "peak_mb": m["peak"] / MB,
                "temp_mb": m["temp"] / MB,
                "argument_mb": m["argument"] / MB,
                "output_mb": m["output"] / MB,
                "seed_mb": seed,
            }
            if args.memory_decode_only:
                row["decode_temp_mb"] = d["temp"] / MB
            out.append(row)
    return out


def markdown(rows_: list[dict]) -> str:
    decode = any("decode_temp_mb" in r for r in rows_)
    lines = [
        "| config | decode | peak MB | temp MB | argument MB | output MB | seed MB | peak / seed | compile s"
        + (" | VAE decode alone: temp MB |" if decode else " |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if decode else ""),
    ]
    for r in rows_:
        seed = r.get("seed_mb")
        ratio = f"{r['peak_mb'] / seed:.2f}" if seed else "-"
        line = (
            f"| {r['case']} | {r['impl']} | {r['peak_mb']:.1f} | {r['temp_mb']:.1f} | {r['argument_mb']:.1f} | "
            f"{r['output_mb']:.1f} | {seed or '-'} | {ratio} | {r['compile_s']:.1f} |"
        )
        if decode:
            line += f" {r['decode_temp_mb']:.1f} |" if "decode_temp_mb" in r else " - |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    print(header())
    print(markdown(rows(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
