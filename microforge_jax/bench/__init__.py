"""Benchmarks, one module per concern: `python -m microforge_jax.bench.<name>`."""
