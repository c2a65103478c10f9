"""Samples images from a MicroForge-JAX run: `python sample.py --prompt "a red circle"`.

The flags and examples (`python sample.py --help`) live in `microforge_jax/commands/sample.py`,
which is also installed as the `microforge-sample` command.
"""

from microforge_jax.commands.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
