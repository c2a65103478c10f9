"""Data: the built-in procedural shapes world (`shapes`, `shapes_render`); numpy only, no JAX."""
