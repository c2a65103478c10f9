"""Trains MicroForge-JAX: `python train.py [--config nano] [--workdir runs/nano] [key=value ...]`.

Runs the config's stages in order (vae, flow, edit); each resumes from its checkpoints in the
work directory, so running the same command again resumes (or says the run is finished).
Overrides are typed by the config's declared values, e.g. `train.flow.steps=2000`.
Own data: `data.source=folder data.path=DIR`; fine-tuning: `--init_from runs/nano` (another run).
Several hosts: pass --coordinator, --num-processes and --process-id (jax.distributed).
Installed as `microforge-train` (pip install .), which takes the same flags.
"""

from __future__ import annotations

import argparse

from microforge_jax import cli


def train(argv: list[str]) -> int:
    """Parses the flags, then trains (raises on bad input; `main` makes that one line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=None, help="nano, tiny, small, base or a .py path (default: the run's own, else nano)"
    )
    parser.add_argument("--workdir", default=None, help="the run directory (default: runs/<config name>)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0, for multi-host training")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument(
        "--init_from", default=None, help="another run's directory: start the flow/edit stages from its EMA weights"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key.path=value")
    args = parser.parse_args(argv)
    if args.init_from:  # the same as the override init_from=DIR, so config.json records it
        args.overrides.append(f"init_from={args.init_from}")

    from microforge_jax import train_lib  # noqa: PLC0415 (flags first: --help stays fast)

    config, workdir = train_lib.config_for_run(args.config, args.overrides, args.workdir)
    train_lib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    summary = train_lib.train_and_evaluate(config, workdir)
    seconds = sum(v for k, v in summary.items() if k.endswith("_seconds"))
    print(f"run finished: {summary['workdir']} ({seconds:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python train.py` and `microforge-train`: a user error is one line on stderr and exit code 2."""
    return cli.run(train, argv)
