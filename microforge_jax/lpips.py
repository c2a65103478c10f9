"""LPIPS (Zhang et al. 2018, the `lpips` package v0.1, VGG variant) in Flax, with frozen weights from a file.

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )

where f_l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled
input `(x - shift) / scale` (the package's ScalingLayer), n(.) divides each feature vector by its
L2 norm over channels (+1e-10), and w_l >= 0 are the learned 1x1 "lin" heads. Images are NHWC in
[-1, 1] (the package's default, `normalize=False`).

Nothing is downloaded: the weights come from ONE safetensors file the user points to
(`train.vae.perceptual = "lpips"`, `train.vae.lpips_weights = "/path/lpips_vgg.safetensors"`),
holding, in PyTorch layouts (float32)::

    features.{N}.weight   (O, I, 3, 3)   N in 0 2 5 7 10 12 14 17 19 21 24 26 28
    features.{N}.bias     (O,)           (torchvision's vgg16().features conv layers)
    lin{i}.model.1.weight (1, C_i, 1, 1) i in 0..4, C = 64 128 256 512 512 (lpips' vgg.pth)

Build it from torchvision's ImageNet VGG16 state dict (`vgg16-397923af.pth`) and the lpips
package's `lpips/weights/v0.1/vgg.pth`:

    python -m microforge_jax.lpips --convert vgg16-397923af.pth vgg.pth lpips_vgg.safetensors

The weights are frozen: they enter the VAE step as a separate argument behind `stop_gradient`,
never through the optimizer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax.config import ConfigError

# torchvision vgg16().features: (index of the conv in `features`, output channels); "M" a 2x2 max pool.
VGG16_LAYOUT: tuple[Any, ...] = (
    (0, 64), (2, 64), "M",
    (5, 128), (7, 128), "M",
    (10, 256), (12, 256), (14, 256), "M",
    (17, 512), (19, 512), (21, 512), "M",
    (24, 512), (26, 512), (28, 512),
)  # fmt: skip
# The ReLU outputs LPIPS compares: after these convs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
TAPS: tuple[int, ...] = (2, 7, 14, 21, 28)
CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
CONV_INDICES: tuple[int, ...] = tuple(item[0] for item in VGG16_LAYOUT if item != "M")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPSError(ConfigError):
    """An LPIPS weights file that cannot be used; the message is one line naming the file."""


def _normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Each feature vector divided by its L2 norm over channels (lpips.normalize_tensor)."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS distance between two NHWC image batches in [-1, 1] -> (B,), fp32.

    Parameters (from `load_weights`): `features_{N}` {kernel HWIO, bias} for the VGG16 convs and
    `lin{i}` (C_i,) for the heads.
    """

    # None: the backend's default conv precision, as PyTorch's LPIPS gets (TF32 on recent GPUs);
    # jax.lax.Precision.HIGHEST for full fp32 on TPU/GPU (e.g. to compare with a reference).
    precision: Any = None

    def features(self, x_BxHxWx3: jax.Array) -> list[jax.Array]:
        h = (x_BxHxWx3.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        taps = []
        for item in VGG16_LAYOUT:
            if item == "M":
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
                continue
            index, width = item
            h = nn.relu(nn.Conv(width, (3, 3), padding=1, precision=self.precision, name=f"features_{index}")(h))
            if index in TAPS:
                taps.append(h)
        return taps

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array, y_BxHxWx3: jax.Array) -> jax.Array:
        b = x_BxHxWx3.shape[0]
        # One VGG pass over both images (the same weights, twice the batch).
        feats = self.features(jnp.concatenate([x_BxHxWx3, y_BxHxWx3]))
        total = jnp.zeros((b,), jnp.float32)
        for i, f in enumerate(feats):
            w = self.param(f"lin{i}", nn.initializers.ones, (f.shape[-1],), jnp.float32)
            d = jnp.square(_normalize(f[:b]) - _normalize(f[b:]))
            total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w, precision=self.precision), axis=(1, 2))
        return total


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weights file with its PyTorch shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            continue
        index, width = item
        shapes[f"features.{index}.weight"] = (width, cin, 3, 3)
        shapes[f"features.{index}.bias"] = (width,)
        cin = width
    for i, c in enumerate(CHANNELS):
        shapes[f"lin{i}.model.1.weight"] = (1, c, 1, 1)
    return shapes


def params_from_torch(tensors: Mapping[str, np.ndarray], where: str = "the LPIPS weights") -> dict[str, Any]:
    """PyTorch-layout arrays (the file's keys) -> the LPIPS module's Flax params; checked strictly.

    Raises:
      LPIPSError: a missing key, a wrong shape, a non-finite value or a negative head weight.
    """
    shapes = expected_shapes()
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise LPIPSError(
            f"{where} lack {len(missing)} of {len(shapes)} keys, e.g. {', '.join(missing[:3])} "
            f"(expected torchvision features.N.weight/bias and lpips lin{{i}}.model.1.weight)"
        )
    arrays = {}
    for key, shape in shapes.items():
        a = np.asarray(tensors[key], np.float32)
        if a.shape != shape:
            raise LPIPSError(f"{where}: {key} has shape {a.shape}, expected {shape}")
        if not np.all(np.isfinite(a)):
            raise LPIPSError(f"{where}: {key} has non-finite values")
        arrays[key] = a
    params: dict[str, Any] = {}
    for index in CONV_INDICES:
        params[f"features_{index}"] = {
            "kernel": np.ascontiguousarray(arrays[f"features.{index}.weight"].transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            "bias": arrays[f"features.{index}.bias"],
        }
    for i in range(len(CHANNELS)):
        w = arrays[f"lin{i}.model.1.weight"].reshape(-1)
        if np.any(w < 0):  # the package clamps them at zero while training: a negative one is another tensor
            raise LPIPSError(f"{where}: lin{i}.model.1.weight has negative entries (LPIPS heads are non-negative)")
        params[f"lin{i}"] = w
    return {"params": params}


def load_weights(path: str | Path) -> dict[str, Any]:
    """Reads the single safetensors file described in the module docstring -> Flax params (numpy).

    Raises:
      LPIPSError: no path, a missing or unreadable file, or missing/misshapen keys (one line).
    """
    if not str(path):
        raise LPIPSError(
            "train.vae.perceptual='lpips' needs train.vae.lpips_weights=/path/to/lpips_vgg.safetensors "
            "(build it with: python -m microforge_jax.lpips --convert VGG16.pth LPIPS_VGG.pth OUT.safetensors)"
        )
    path = Path(path)
    if not path.is_file():
        raise LPIPSError(f"LPIPS weights file {path} does not exist (train.vae.lpips_weights)")
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LPIPSError(f"LPIPS weights file {path} is not a readable safetensors file ({first})") from None
    return params_from_torch(tensors, where=f"LPIPS weights file {path}")


def convert(vgg_pth: str | Path, lin_pth: str | Path, out: str | Path) -> Path:
    """torchvision's vgg16 state dict + lpips' vgg.pth (lin heads) -> one safetensors file.

    Both are read with `torch.load(weights_only=True)` (no pickled code runs). Keys that LPIPS
    does not use (the VGG classifier) are dropped; the result is checked by `params_from_torch`.
    """
    import torch  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415

    def read(path: str | Path) -> dict[str, np.ndarray]:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise LPIPSError(f"{path} does not exist") from None
        except Exception as e:  # torch raises many types for a file that is not a (safe) state dict
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LPIPSError(f"{path} cannot be read by torch.load(weights_only=True): {first[:200]}") from None
        if not isinstance(state, Mapping):
            raise LPIPSError(f"{path} is not a state dict")
        return {k: v.detach().float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}

    vgg, lin = read(vgg_pth), read(lin_pth)
    # lpips' own checkpoints of the whole model name the VGG "net.slice*"; accept the plain
    # torchvision names, with or without a leading "module." (DataParallel) or "vgg.".
    vgg = {k.removeprefix("module.").removeprefix("vgg."): v for k, v in vgg.items()}
    lin = {k.removeprefix("module."): v for k, v in lin.items()}
    shapes = expected_shapes()
    tensors = {k: np.ascontiguousarray(v) for k, v in {**vgg, **lin}.items() if k in shapes}
    params_from_torch(tensors, where=f"{vgg_pth} + {lin_pth}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "microforge-lpips-vgg-v0.1"})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m microforge_jax.lpips", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--convert",
        nargs=3,
        metavar=("VGG16_PTH", "LPIPS_VGG_PTH", "OUT_SAFETENSORS"),
        required=True,
        help="torchvision vgg16 state dict + lpips v0.1 vgg.pth -> one safetensors file",
    )
    args = parser.parse_args(argv)
    out = convert(*args.convert)
    print(f"wrote {out} ({len(expected_shapes())} tensors)")
    return 0


if __name__ == "__main__":
    from microforge_jax.cli import run  # noqa: PLC0415

    sys.exit(run(main))
