"""All sharding mechanics in one place: the mesh, logical-to-mesh rules, sharded init, batches.

Model code names logical axes (`microforge_jax.axes`); the config chooses the mesh
(`sharding.mesh_axes`, `sharding.mesh_shape`) and the rules mapping logical axes to mesh axes
(`sharding.rules`). Parameters are created shape-first and already sharded:
`jax.eval_shape` -> logical specs -> NamedShardings -> a jitted init with `out_shardings`, so no
device ever holds the whole unsharded model.

A dimension that its mesh axes do not divide is replicated instead (e.g. a conv kernel's 3 input
channels over `fsdp=2`): jit refuses uneven shardings, and such tensors are small.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from microforge_jax import axes

Rules = tuple[tuple[str, Any], ...]


def make_mesh(mesh_axes: Sequence[str], mesh_shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh; one entry of `mesh_shape` may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape)
    if len(shape) != len(mesh_axes):
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not match mesh_axes {tuple(mesh_axes)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh dimension may be -1, got {tuple(mesh_shape)}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {dict(zip(mesh_axes, mesh_shape))}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {dict(zip(mesh_axes, shape))} needs {math.prod(shape)} devices, have {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):  # unusual topologies: plain order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, tuple(mesh_axes))


def mesh_from_config(sharding_config, devices: Sequence[Any] | None = None) -> Mesh:
    return make_mesh(tuple(sharding_config.mesh_axes), tuple(sharding_config.mesh_shape), devices)


def rules_from_config(sharding_config) -> Rules:
    """The logical-to-mesh rules of a config, validated against the known logical axes."""
    rules = []
    for logical, mesh_axis in sharding_config.rules:
        if logical not in axes.ALL:
            raise ValueError(f"sharding rule for unknown logical axis {logical!r}; known: {', '.join(axes.ALL)}")
        rules.append((logical, tuple(mesh_axis) if isinstance(mesh_axis, list) else mesh_axis))
    return tuple(rules)


def _axis_size(mesh: Mesh, mesh_axis: Any) -> int:
    if mesh_axis is None:
        return 1
    names = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)
    return math.prod(mesh.shape[n] for n in names)


def _present(mesh_axis: Any, mesh: Mesh) -> Any:
    """Drops mesh axes this mesh lacks (e.g. "tensor" in a (data, fsdp) mesh)."""
    if mesh_axis is None:
        return None
    names = tuple(n for n in ((mesh_axis,) if isinstance(mesh_axis, str) else mesh_axis) if n in mesh.shape)
    return None if not names else names[0] if len(names) == 1 else names


def mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """The mesh PartitionSpec for one array: the rules applied, undivisible dims replicated."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    dims = [_present(a, mesh) for a in spec] + [None] * (len(shape) - len(spec))
    return PartitionSpec(*(a if size % _axis_size(mesh, a) == 0 else None for size, a in zip(shape, dims)))


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (boxed, logically partitioned) abstract arrays.

    Unboxed leaves (step counters, optimizer counts) are replicated; the result has the structure
    of the unboxed tree (optax's empty `MaskedNode`s included).
    """

    def one(x: Any) -> Any:
        if isinstance(x, nn.LogicallyPartitioned):
            if not hasattr(x.value, "shape"):  # a box around an empty node (optax.masked's MaskedNode)
                return x.value
            return NamedSharding(mesh, mesh_spec(tuple(x.names), x.value.shape, mesh, rules))
        return NamedSharding(mesh, mesh_spec((), x.shape, mesh, rules))

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` and `rules` current, so `nn.with_logical_constraint` in modules applies."""
    # jax.set_mesh where it exists (newer JAX deprecates `with mesh:`).
    mesh_context = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
    with mesh_context, nn.logical_axis_rules(rules):
        yield


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """Runs `init_fn` (returning boxed variables) shape-first and already sharded.

    Returns:
      (variables, shardings): unboxed variables placed per the rules, and their NamedShardings.
    """
    # Rules only, no current mesh: the placement comes from out_shardings alone.
    with nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_fn)
        shardings = logical_to_shardings(abstract, mesh, rules)
        variables = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
    return variables, shardings


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """The sharding of a batch-leading array: dim 0 over the `batch` rule's mesh axes."""
    batch_axes = _present(nn.logical_to_mesh_axes((axes.BATCH,), rules)[0], mesh)
    return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Turns each process's local batch (numpy, leading batch dim) into global jax Arrays."""

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, rules, x.ndim)
        shards = _axis_size(mesh, sharding.spec[0]) // jax.process_count()
        if x.shape[0] % max(shards, 1):
            raise ValueError(f"local batch of {x.shape[0]} does not split over {shards} local batch shards")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


def put_global(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)` that also works when the mesh spans several processes.

    Every process passes the same host values (e.g. frozen parameters, a restored model); each
    places only the shards its own devices hold. PRNG key arrays go through their key data.
    """

    def one(x: Any, s: Any) -> Any:
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), s)
            return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=jax.random.key_impl(x)), out_shardings=s)(data)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """`jax.device_get` for arrays sharded over several processes: every process gets the whole tree."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            x = jax.jit(lambda v: v, out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))(x)
        return jax.device_get(x)

    return jax.tree.map(one, tree)
