"""Samples images from a MicroForge-JAX run: `python sample.py --prompt "a red circle"`."""

import argparse

from microforge_jax import cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/nano", help="the run to sample from")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.parse_args(argv)
    print("the sampler is not built yet (issue 7).")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
