"""Trains MicroForge-JAX: `python train.py [--config nano] [--workdir runs/nano] [key=value ...]`.

Overrides are typed by the config's declared values, e.g. `model.backbone.depth=4 batch_size=16`.
"""

import argparse

from microforge_jax import cli
from microforge_jax.config import load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="nano", help="a config name (nano, tiny, small, base) or a .py path")
    parser.add_argument("--workdir", default=None, help="the run directory (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.path=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    workdir = args.workdir or f"runs/{config.name}"
    print(f"config {config.name!r} loaded for {workdir}; the trainer is not built yet (issue 6).")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
