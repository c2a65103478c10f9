"""Trained VAE weights as one safetensors file: written from a run, read by the VAE stage.

A config with `train.vae.pretrained = FILE` (or "nano": the file shipped in `microforge_jax/assets/`)
starts its run from those weights instead of training the VAE: the stage writes them as its finished
checkpoint, with the latent scale and shift from the file's metadata, so the run is self-contained
and the flow stage gets all the minutes. Reproduce the shipped file with

    python train.py --workdir runs/nano_vae "stages=('vae',)" train.vae.pretrained= train.vae.steps=4000
    python -m microforge_jax.vae_weights --workdir runs/nano_vae --out microforge_jax/assets/nano_vae.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = {"nano": ASSETS / "nano_vae.safetensors"}


class WeightsError(ValueError):
    """A weights file that cannot be used; one line for the user."""


def resolve(name_or_path: str) -> Path:
    """A shipped name ("nano") or a path -> the file's path (not checked)."""
    return SHIPPED.get(name_or_path, Path(name_or_path))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": leaf}} -> {"a/b": leaf} (leaves as they are: arrays or shape structs)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save(path: str | Path, params: Any, model_vae: dict[str, Any]) -> Path:
    """Writes a VAE parameter tree and its model config section (channels, factor, latent scale/shift)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v), np.float32) for k, v in _flatten(params).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata={"model.vae": json.dumps(model_vae, sort_keys=True)})
    tmp.replace(path)
    return path


def load(name_or_path: str, expected: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a weights file; its names and shapes must be exactly those of `expected` (a tree of shapes).

    Returns:
      (params, model_vae): the parameter tree (numpy) and the file's model config section.

    Raises:
      WeightsError: a missing or unreadable file, or names / shapes that differ from `expected`.
    """
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = resolve(name_or_path)
    if not path.is_file():
        raise WeightsError(f"VAE weights not found: {path} (train.vae.pretrained={name_or_path!r})")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("model.vae", "{}"))
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read VAE weights {path}: {str(e).splitlines()[0]}") from None
    want = {k: tuple(v.shape) for k, v in _flatten(expected).items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        detail = (
            f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else f"shapes of {shapes[:3]}"
        )
        raise WeightsError(f"VAE weights {path} do not fit this config's VAE ({detail})")
    return _unflatten(flat), meta


def main(argv: list[str] | None = None) -> int:
    """`python -m microforge_jax.vae_weights --workdir RUN --out FILE`: a run's VAE EMA weights -> FILE."""
    p = argparse.ArgumentParser(prog="python -m microforge_jax.vae_weights", description=main.__doc__)
    p.add_argument("--workdir", type=Path, required=True, help="a run with a trained VAE stage")
    p.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    args = p.parse_args(argv)
    from microforge_jax import checkpoint  # noqa: PLC0415 (loads jax)

    try:
        config, params = checkpoint.load_run(args.workdir)
    except checkpoint.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "vae" not in params or not params["vae"]:
        print(f"error: run {args.workdir} has no trained VAE", file=sys.stderr)
        return 2
    path = save(args.out, params["vae"], config.model.vae.to_dict())
    print(
        f"wrote {path} (latent scale {config.model.vae.scaling_factor:.4f}, shift {config.model.vae.shift_factor:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
