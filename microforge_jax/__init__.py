"""MicroForge-JAX: a compact text-to-image generator in JAX/Flax.

Importing the package imports no JAX, so that `microforge_jax.export.torch_model` works in a
torch-only environment. Import the submodules you need (`microforge_jax.models.vae`, ...).
"""

__version__ = "0.1.0"
