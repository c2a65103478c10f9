"""JAX parameter trees <-> PyTorch state dicts for `torch_model.MicroForgeTorch`, strict both ways.

Name rules (the torch modules carry the JAX names, so the mapping is mechanical):

- the JAX path joined with "." is the torch name, under `vae.`, `denoiser.` and `text.`
  (`params["vae"]["encoder"]["conv_in"]["kernel"]` <-> `vae.encoder.conv_in.weight`);
- leaves: `kernel` -> `weight` (Dense (in, out) -> Linear (out, in); Conv HWIO -> OIHW, the
  depthwise (K, K, 1, E) -> (E, 1, K, K); a 1-D conv (K, I, O) -> (O, I, K)), `scale` -> `weight`
  (LayerNorm, GroupNorm), `embedding` -> `weight` (Embed), `bias` -> `bias`;
- raw parameters keep their names and layout: `A_log`, `D`, `plan_init`, `segment_embed`,
  `task_embed`, `mod_offset`, `cross_gate`, `gate`, `carry_gate`.

Every JAX leaf maps to exactly one torch tensor of the expected shape and back; a missing or
extra name, or a wrong shape, raises `ConversionError` naming them. Imports no JAX: trees are
nested mappings of arrays (anything `np.asarray` accepts, boxed Flax leaves are unboxed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

# What a torch parameter is, from the module that owns it: (JAX leaf name, torch -> JAX layout).
_DENSE, _CONV2D, _CONV1D, _SAME = "dense", "conv2d", "conv1d", "same"


class ConversionError(ValueError):
    """A parameter tree that does not match the model; the message names the offending parameters."""


def _leaf_rule(module: nn.Module, name: str) -> tuple[str, str]:
    """(JAX leaf name, layout kind) of torch parameter `name` owned directly by `module`."""
    if name == "weight":
        if isinstance(module, nn.Linear):
            return "kernel", _DENSE
        if isinstance(module, nn.Conv2d):
            return "kernel", _CONV2D
        if isinstance(module, nn.Conv1d):
            return "kernel", _CONV1D
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return "scale", _SAME
        if isinstance(module, nn.Embedding):
            return "embedding", _SAME
    return name, _SAME


def param_table(model: nn.Module) -> dict[str, tuple[str, str]]:
    """torch name -> (JAX path "a/b/kernel", layout kind) for every parameter of `model`."""
    table = {}
    for mod_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            leaf, kind = _leaf_rule(module, name)
            prefix = mod_name.replace(".", "/") + "/" if mod_name else ""
            table[f"{mod_name}.{name}" if mod_name else name] = (prefix + leaf, kind)
    return table


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == _DENSE:
        return x.T
    if kind == _CONV2D:
        return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW; depthwise (K, K, 1, E) -> (E, 1, K, K)
    if kind == _CONV1D:
        return x.transpose(2, 1, 0)
    return x


def _to_jax_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == _DENSE:
        return x.T
    if kind == _CONV2D:
        return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind == _CONV1D:
        return x.transpose(2, 1, 0)
    return x


def _unbox(x: Any) -> Any:
    """A Flax `LogicallyPartitioned` / `Partitioned` box -> its value (without importing flax)."""
    return x.unbox() if hasattr(x, "unbox") and callable(x.unbox) else x


def _strip_params(tree: Any) -> Any:
    """`{"params": tree}` -> tree (variables dicts and bare trees are both accepted)."""
    return tree["params"] if isinstance(tree, Mapping) and set(tree) == {"params"} else tree


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"vae": tree, "denoiser": tree, ...} -> {"vae/encoder/conv_in/kernel": array, ...}."""
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        node = _unbox(node)
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = np.asarray(node)

    for top, tree in params.items():
        walk(_strip_params(tree), str(top))
    return flat


def _problems(what: str, names: set[str], limit: int = 8) -> str:
    shown = sorted(names)
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return f"{what}: {', '.join(shown[:limit])}{more}"


def jax_to_torch(params: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Maps `{"vae": ..., "denoiser": ..., "text"?: ...}` JAX trees onto `model`'s state dict.

    Args:
      params: what `load_run` returns (bare trees or `{"params": tree}` variables).
      model: a `MicroForgeTorch` (or any module whose names mirror the trees).

    Returns:
      The state dict (fp32 tensors as stored; load it with `model.load_state_dict(sd, strict=True)`).

    Raises:
      ConversionError: JAX leaves without a torch parameter, torch parameters without a JAX leaf,
        or shape mismatches, named.
    """
    flat = flatten(params)
    table = param_table(model)
    expected = {jax_name for jax_name, _ in table.values()}
    missing, extra = expected - set(flat), set(flat) - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(_problems("missing from the JAX parameters", missing))
        if extra:
            parts.append(_problems("JAX parameters with no torch counterpart", extra))
        raise ConversionError("parameter trees do not match the model; " + "; ".join(parts))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, bad = {}, []
    for torch_name, (jax_name, kind) in table.items():
        value = _to_torch_layout(flat[jax_name], kind)
        if value.shape != shapes[torch_name]:
            bad.append(f"{jax_name} {flat[jax_name].shape} -> {torch_name} expects {shapes[torch_name]}")
            continue
        state[torch_name] = torch.from_numpy(np.array(value, order="C", copy=True))
    if bad:
        raise ConversionError("shape mismatch: " + "; ".join(bad[:8]))
    return state


def torch_to_jax(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """The inverse of `jax_to_torch`: a state dict -> `{"vae": tree, "denoiser": tree, ...}` of numpy arrays.

    Raises:
      ConversionError: names missing from or unknown to `model`, or shape mismatches, named.
    """
    table = param_table(model)
    missing, extra = set(table) - set(state_dict), set(state_dict) - set(table)
    if missing or extra:
        parts = []
        if missing:
            parts.append(_problems("missing from the state dict", missing))
        if extra:
            parts.append(_problems("unexpected in the state dict", extra))
        raise ConversionError("state dict does not match the model; " + "; ".join(parts))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out: dict[str, Any] = {}
    for torch_name, (jax_name, kind) in table.items():
        tensor = state_dict[torch_name]
        if tuple(tensor.shape) != shapes[torch_name]:
            raise ConversionError(
                f"shape mismatch: {torch_name} is {tuple(tensor.shape)}, expected {shapes[torch_name]}"
            )
        node = out
        *path, leaf = jax_name.split("/")
        for part in path:
            node = node.setdefault(part, {})
        # np.array, not np.ascontiguousarray: the latter turns the 0-d carry_gate into shape (1,).
        node[leaf] = np.array(_to_jax_layout(tensor.detach().cpu().numpy(), kind), order="C")
    return out
