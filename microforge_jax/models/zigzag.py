"""Zigzag (snake) scan paths over a token grid (ZigMa, arXiv 2403.13802).

A path is a permutation of the raster indices of an (H, W) grid: `x[:, path]` puts tokens in
path order and `y[:, inverse(path)]` puts them back. Consecutive layers use different paths so
that every token is, somewhere in the stack, adjacent in scan order to each of its grid neighbours.
Paths are built with numpy from the static grid shape, once per layer at trace time.
"""

from __future__ import annotations

import numpy as np

# (snake over rows or columns, flip rows, flip columns); row and column snakes alternate so that
# consecutive layers never share a scan direction.
PATHS = (
    ("row", False, False),
    ("col", False, False),
    ("row", True, False),
    ("col", False, True),
    ("row", False, True),
    ("col", True, False),
    ("row", True, True),
    ("col", True, True),
)


def zigzag_path(height: int, width: int, layer_index: int) -> np.ndarray:
    """The scan order of layer `layer_index` (paths cycle through `PATHS`).

    Args:
      height, width: the token grid (tokens in raster order, L = height * width).
      layer_index: the layer; `PATHS[layer_index % len(PATHS)]` is used.

    Returns:
      (L,) int32 array: position k of the path visits raster index path[k].
    """
    kind, flip_rows, flip_cols = PATHS[layer_index % len(PATHS)]
    grid = np.arange(height * width, dtype=np.int32).reshape(height, width)
    if flip_rows:
        grid = grid[::-1]
    if flip_cols:
        grid = grid[:, ::-1]
    if kind == "col":
        grid = grid.T
    grid = grid.copy()
    grid[1::2] = grid[1::2, ::-1]  # boustrophedon: every other line runs backwards
    return grid.reshape(-1)


def inverse(path: np.ndarray) -> np.ndarray:
    """The inverse permutation: `x[:, path][:, inverse(path)] == x`."""
    inv = np.empty_like(path)
    inv[path] = np.arange(path.size, dtype=path.dtype)
    return inv


def permute(x, path: np.ndarray, axis: int = 1):
    """`jnp.take(x, path, axis)` whose backward is the inverse gather, not a scatter-add.

    Autodiff of a gather transposes to a scatter-add, which XLA CPU runs as a serial loop; for a
    permutation the cotangent is simply gathered back with `inverse(path)`.
    """
    import jax
    import jax.numpy as jnp

    path = np.asarray(path)
    inv = inverse(path)

    @jax.custom_vjp
    def f(x):
        return jnp.take(x, path, axis=axis)

    f.defvjp(lambda x: (f(x), None), lambda _, g: (jnp.take(g, inv, axis=axis),))
    return f(x)
