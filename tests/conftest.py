"""Test set-up: 8 fake CPU devices, a persistent compilation cache, and the redraw fixture.

XLA_FLAGS must be set before anything imports jax, which is why it happens at import time here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def redraw_params(params, seed: int = 0, scale: float = 1.0):
    """Redraws every parameter from a non-degenerate distribution (DESIGN §7).

    Zero-initialised gates and output layers make a fresh model an identity or a constant, so
    comparisons between two computations of it pass on anything. Kernels get N(0, 1/fan_in)
    (fan_in = all dims but the last), vectors N(0, 0.3^2) around 1 for norm scales and around 0
    otherwise; `A_log`-like parameters keep their sign structure by staying around their value.
    """
    import flax.linen as nn

    params = nn.unbox(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree_util.tree_structure(params)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in flat:
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = np.shape(leaf), np.asarray(leaf).dtype
        if name == "scale" or name.endswith("_scale"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif "A_log" in name:
            value = np.asarray(leaf, np.float64) + 0.3 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1])) or 1
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:
            value = 0.3 * rng.standard_normal(shape)
        leaves.append(jax.numpy.asarray(scale * value if name not in ("scale",) else value, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="session")
def redraw():
    """The shared fixture: `redraw(params, seed=0)` -> params with every leaf redrawn."""
    return redraw_params


def normwise(a, b) -> float:
    """||a - b|| / ||b||, computed in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session")
def relerr():
    return normwise
