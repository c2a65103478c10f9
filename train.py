"""Trains MicroForge-JAX: `python train.py [--config nano] [--workdir runs/nano] [key=value ...]`.

The flags (`python train.py --help`) live in `microforge_jax/commands/train.py`, which is also
installed as the `microforge-train` command.
"""

from microforge_jax.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
