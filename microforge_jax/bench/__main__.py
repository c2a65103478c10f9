"""The benchmark command: every part side by side in one process, one table, markdown for BENCHMARKS.md.

    python -m microforge_jax.bench [--parts sampling,train,bissm,memory,accel] [--config tiny] [--size 256]
        [--batches 1,8] [--steps 4] [--repeats 5] [--train-batch 8] [--torch-compile auto|on|off] [--quick]

Parts: `sampling` (the jitted guided sampler vs the PyTorch mirror, eager and torch.compile, with
the FLOP rate and where the time goes), `train` (one flow train step, JAX vs PyTorch eager),
`bissm`, `memory` and `accel` (bf16 training MFU and sampling throughput at 512 px, opt-in: for
accelerators) (their own modules, `microforge_jax/bench/<part>.py`, each with
`add_arguments(parser)` and `rows(args) -> list[dict]`). Every row is a dict
{"part", "case", "impl", "median_ms", "compile_s", "ratio", "note"}.

`--quick`: the nano config at 64 px, batch 1, 2 steps, 1 repeat, no torch.compile and no profile
(a smoke run: seconds, not numbers to quote). `--set key=value` overrides a config key.
"""

from __future__ import annotations

import os

# Before torch (and its OpenMP runtime) loads: worker threads that spin at barriers stall every op
# when the cores are shared (measured 3-25x slower torch ops at load 7 on 2 cores); sleeping ones don't.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib
import importlib.util
import sys
from typing import Any

from microforge_jax.bench.machine import header

PARTS = ("sampling", "train", "bissm", "memory", "accel")
DEFAULT_PARTS = ("sampling", "train", "bissm", "memory")  # accel (512 px small/base in bf16) is for accelerators
OWN_PARTS = ("sampling", "train")  # bench/compare.py and bench/train_step.py; the others are bench/<part>.py
COLUMNS = ("part", "case", "impl", "median_ms", "compile_s", "ratio", "note")


def _cell(value: Any, key: str) -> str:
    if value is None or value == "":
        return "-"
    if key == "median_ms":
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if key == "compile_s":
        return f"{value:.1f}"
    return str(value).replace("|", "/")


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table."""
    lines = ["| part | case | impl | median ms | compile s | ratio | note |", "|---|---|---|---:|---:|---|---|"]
    lines += ["| " + " | ".join(_cell(r.get(k), k) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plain(rows: list[dict]) -> str:
    """The rows as an aligned text table (the note column last, unpadded)."""
    cells = [[_cell(r.get(k), k) for k in COLUMNS] for r in rows]
    names = ["part", "case", "impl", "median ms", "compile s", "ratio", "note"]
    widths = [max(len(x) for x in col) for col in zip(names, *cells)]
    fmt = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs[:-1], widths[:-1])) + "  " + xs[-1]
    return "\n".join([fmt(names), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)])


def _part_module(name: str):
    """bench/<name>.py if it exists, else None."""
    full = f"microforge_jax.bench.{name}"
    return importlib.import_module(full) if importlib.util.find_spec(full) is not None else None


def build_parser(parts: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m microforge_jax.bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    parser.add_argument("--config", default=None, help="model config (default tiny; nano with --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 256; 64 with --quick)")
    parser.add_argument("--batches", default=None, help="sampling batch sizes (default 1,8; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="guided Euler steps (default 4; 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; 1 with --quick)")
    parser.add_argument("--train-batch", type=int, default=None, help="train-step batch (default 8; 2 with --quick)")
    parser.add_argument("--torch-compile", default="auto", choices=("auto", "on", "off"),
                        help="torch.compile rows for sampling (auto: off with --quick)")  # fmt: skip
    parser.add_argument("--no-profile", action="store_true", help="skip the sampling time split")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (nano, 64 px, batch 1)")
    for name in parts if parts is not None else PARTS:
        module = None if name in OWN_PARTS else _part_module(name)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = {
        "config": "nano" if quick else "tiny",
        "size": 64 if quick else 256,
        "batches": "1" if quick else "1,8",
        "steps": 2 if quick else 4,
        "repeats": 1 if quick else 5,
        "train_batch": 2 if quick else 8,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def own_rows(name: str, args: argparse.Namespace) -> list[dict]:
    """Rows of the parts in bench/compare.py."""
    from microforge_jax.bench import compare, train_step
    from microforge_jax.config import load_config

    compare.setup_torch()
    config = load_config(args.config, args.set)
    if name == "train":
        return train_step.train_rows(config, args.size, args.train_batch, args.repeats)
    matmul = compare.matmul_rate(2048 if not args.quick else 512, args.repeats)
    print(f"[sampling] f32 matmul: JAX {matmul['jax']:.0f} GFLOP/s, torch {matmul['torch']:.0f} GFLOP/s", flush=True)
    use_compile = args.torch_compile == "on" or (args.torch_compile == "auto" and not args.quick)
    batches = [int(b) for b in str(args.batches).split(",") if b]
    return compare.sampling_rows(
        config, args.size, args.steps, batches, args.repeats,
        use_compile=use_compile, profile=not (args.no_profile or args.quick), matmul=matmul,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--parts", default=",".join(DEFAULT_PARTS))
    wanted = [p for p in pre.parse_known_args(argv)[0].parts.split(",") if p]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    args = _resolve(build_parser(wanted).parse_args(argv))

    rows: list[dict] = []
    missing = []
    for name in wanted:
        if name in OWN_PARTS:
            print(f"[{name}] running ...", flush=True)
            rows.extend(own_rows(name, args))
            continue
        module = _part_module(name)
        if module is None or not hasattr(module, "rows"):
            missing.append(name)
            print(f"[{name}] skipped: microforge_jax/bench/{name}.py with rows(args) is not there", flush=True)
            continue
        print(f"[{name}] running ...", flush=True)
        rows.extend(module.rows(args))

    print()
    print(header())
    print()
    print(plain(rows))
    print()
    print("Markdown for BENCHMARKS.md:\n")
    print(f"`python -m microforge_jax.bench {' '.join(argv)}`".replace(" `", "`"))
    print()
    print(header())
    print()
    print(markdown(rows))
    if missing:
        print(f"\n(parts not run: {', '.join(missing)}: their modules are missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
