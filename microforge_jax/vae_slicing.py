"""VAE slicing (diffusers' `enable_vae_slicing`): how many images one VAE call should take.

No JAX here: the PyTorch mirror (`export.torch_model`) uses the same rule.

On a CPU the VAE's full-resolution convolutions slow down ~2x once a call's activations outgrow
the cache: on a 2-core AMD EPYC (2026-11-27, `python -m microforge_jax.bench.slicing`, BENCHMARKS.md
"VAE slicing"), tiny's 256 px batch of 8 encoded 1.20x and decoded 1.11x faster one image at a time
(PyTorch's oneDNN convolutions gain more: 1.52x / 1.57x); at 128 px slices of 4 gained ~5%, and at
64 px slices of 16 were within noise. Accelerators and sharded batches take the whole batch: there
slicing would serialise parallel work.
"""

from __future__ import annotations

SLICE_PIXELS = 256 * 256


def slice_size(batch: int, pixels: int, *, cpu: bool, devices: int = 1) -> int:
    """Images per VAE call for `batch` images of `pixels` pixels each (at the image's resolution).

    On one CPU device: the largest divisor of `batch` not above `SLICE_PIXELS // pixels` (at least 1),
    so every slice has the same shape (one compiled body). Otherwise: `batch`.
    """
    if batch < 1 or pixels < 1:
        raise ValueError(f"batch and pixels must be positive, got {batch} and {pixels}")
    if not cpu or devices > 1:
        return batch
    target = max(1, min(batch, SLICE_PIXELS // pixels))
    return max(d for d in range(1, target + 1) if batch % d == 0)
