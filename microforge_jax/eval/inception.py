"""The FID Inception v3 (pytorch-fid's `fid_inception_v3`) in Flax, with frozen weights from a file.

This is the network FID is defined with: TensorFlow's 2015-12-05 Inception graph as ported to
PyTorch by pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`, the weights torchmetrics' FID
loads through torch-fidelity too). It is torchvision's Inception3 with the FID patches: the
average pools of Mixed_5b-d, 6b-e and 7b exclude the zero padding (TensorFlow's pooling), and
Mixed_7c pools with a max instead of an average. Features are the 2048-d output of the final
average pool ("pool3"); images are resized to 299x299 (bilinear, half-pixel centres, no
antialiasing: torch's `F.interpolate(align_corners=False)`) and scaled from [0, 1] to [-1, 1].

Nothing is downloaded: the weights come from ONE safetensors file the user points to
(`python -m microforge_jax.eval --fid --inception inception.safetensors ...`), holding
pytorch-fid's state dict in PyTorch layouts (float32): for every BasicConv2d `NAME`
(`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, ...) `NAME.conv.weight` (O, I, kh, kw) and
`NAME.bn.{weight,bias,running_mean,running_var}` (O,). Build it from pytorch-fid's release file
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth):

    python -m microforge_jax.eval.inception --convert pt_inception-2015-12-05-6726825d.pth --out inception.safetensors

Only the converter imports torch; the Flax model needs numpy and safetensors.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax.config import ConfigError

FID_SIZE = 299
FEATURES = 2048
MIN_SIZE = 75  # the smallest input the stride-2 stages leave a 1x1 map for
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
BN_EPS = 1e-3  # torchvision's BasicConv2d


class InceptionError(ConfigError):
    """An Inception weights file that cannot be used; the message is one line naming the file."""


def resize_bilinear(x_BxHxWxC: jax.Array, size: int) -> jax.Array:
    """Bilinear resize to size x size as torch's `F.interpolate(mode="bilinear", align_corners=False)`
    (half-pixel centres, no antialiasing when shrinking)."""
    b, _, _, c = x_BxHxWxC.shape
    return jax.image.resize(x_BxHxWxC, (b, size, size, c), "bilinear", antialias=False)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU; torch's names `conv`, `bn`."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features, self.kernel, strides=self.strides, padding=((ph, ph), (pw, pw)),
            use_bias=False, precision=self.precision, name="conv",
        )(x)  # fmt: skip
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool: padded zeros do not count (pytorch-fid's patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, precision=self.precision, name=name)
        b3 = conv(384, (3, 3), 2, (0, 0), "branch3x3")(x)
        bd = conv(64, (1, 1), 1, (0, 0), "branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), 1, (1, 1), "branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), 2, (0, 0), "branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, precision=self.precision, name=name)
        b3 = conv(192, (1, 1), 1, (0, 0), "branch3x3_1")(x)
        b3 = conv(320, (3, 3), 2, (0, 0), "branch3x3_2")(b3)
        b7 = conv(192, (1, 1), 1, (0, 0), "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), 2, (0, 0), "branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (`max_pool=False`: average pool without the padding) and Mixed_7c (`max_pool=True`,
    pytorch-fid's FIDInceptionE_2: the TF graph max-pools here)."""

    max_pool: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3), conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1
        )
        bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd), conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pool3 features (B, 2048), fp32, of NHWC images with values in [0, 1].

    `resize_to`: the square size images are resized to first (299; None: as given, at least 75).
    Variables (from `load_weights`): "params" {conv kernel HWIO, bn scale/bias} and "batch_stats"
    {bn mean/var}, under the PyTorch module names (`Conv2d_1a_3x3/conv`, `Mixed_5b/branch1x1/bn`, ...).
    """

    resize_to: int | None = FID_SIZE
    # Full fp32 convolutions on GPU/TPU too (their default is TF32/bf16 passes): FID is sensitive to it.
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
        x = x_BxHxWx3.astype(jnp.float32)
        if self.resize_to is not None:
            x = resize_bilinear(x, self.resize_to)
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"the FID Inception needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1:3]}")
        x = 2.0 * x - 1.0
        p = self.precision
        x = BasicConv2d(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- weights

# Flax leaf -> (collection, PyTorch suffix); the module path maps "/" <-> ".".
_LEAVES = {
    ("params", "conv", "kernel"): "conv.weight",
    ("params", "bn", "scale"): "bn.weight",
    ("params", "bn", "bias"): "bn.bias",
    ("batch_stats", "bn", "mean"): "bn.running_mean",
    ("batch_stats", "bn", "var"): "bn.running_var",
}
# What pytorch-fid's state dict holds besides the features: the 1008-way classifier and BN counters.
_UNUSED_SUFFIXES = ("num_batches_tracked",)
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")


@functools.cache
def _flax_layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (Flax variable path, Flax shape), from the module's own variable shapes."""
    shapes = jax.eval_shape(
        lambda: FIDInceptionV3(resize_to=None).init(jax.random.key(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
    )
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(str(k.key) for k in path)
        collection, *modules, layer, name = keys
        key = ".".join(modules) + "." + _LEAVES[(collection, layer, name)]
        layout[key] = (keys, tuple(leaf.shape))
    return layout


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weights file with its PyTorch shape."""
    out = {}
    for key, (_, shape) in _flax_layout().items():
        out[key] = (shape[3], shape[2], shape[0], shape[1]) if key.endswith("conv.weight") else shape
    return out


def params_from_torch(tensors: Mapping[str, np.ndarray], where: str = "the Inception weights") -> dict[str, Any]:
    """PyTorch-layout arrays (pytorch-fid's state dict names) -> the Flax variables; checked strictly.

    Keys of the classifier (`fc.*`) and BatchNorm counters are ignored; any other unknown key, a
    missing key, a wrong shape or a non-finite value is an `InceptionError`.
    """
    layout = _flax_layout()
    missing = [k for k in layout if k not in tensors]
    if missing:
        raise InceptionError(
            f"{where} lack {len(missing)} of {len(layout)} keys, e.g. {', '.join(missing[:3])} "
            "(expected pytorch-fid's FID Inception state dict: Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.weight, ...)"
        )
    unknown = [k for k in tensors if k not in layout and not _unused(k)]
    if unknown:
        raise InceptionError(f"{where} hold {len(unknown)} unexpected keys, e.g. {', '.join(sorted(unknown)[:3])}")
    variables: dict[str, Any] = {}
    for key, (path, flax_shape) in layout.items():
        a = np.asarray(tensors[key], np.float32)
        if key.endswith("conv.weight"):
            if a.ndim == 4:
                a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if a.shape != flax_shape:
            shown = expected_shapes()[key]
            raise InceptionError(f"{where}: {key} has shape {tuple(np.shape(tensors[key]))}, expected {shown}")
        if not np.all(np.isfinite(a)):
            raise InceptionError(f"{where}: {key} has non-finite values")
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(a)
    return variables


def _unused(key: str) -> bool:
    return key.endswith(_UNUSED_SUFFIXES) or key.startswith(_UNUSED_PREFIXES)


def load_weights(path: str | Path) -> dict[str, Any]:
    """Reads the safetensors file described in the module docstring -> Flax variables (numpy).

    Raises:
      InceptionError: a missing or unreadable file, or missing/misshapen keys (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionError(
            f"Inception weights file {path} does not exist (build it with: python -m microforge_jax.eval.inception "
            f"--convert pt_inception-2015-12-05-6726825d.pth --out {path.name})"
        )
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InceptionError(f"Inception weights file {path} is not a readable safetensors file ({first})") from None
    return params_from_torch(tensors, where=f"Inception weights file {path}")


def convert(pth: str | Path, out: str | Path) -> Path:
    """pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> one safetensors file of the used tensors.

    Read with `torch.load(weights_only=True)` (no pickled code runs); a leading "module." is
    dropped; the result is checked by `params_from_torch` before anything is written.
    """
    import torch  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415

    try:
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InceptionError(f"{pth} does not exist") from None
    except Exception as e:  # torch raises many types for a file that is not a (safe) state dict
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InceptionError(f"{pth} cannot be read by torch.load(weights_only=True): {first[:200]}") from None
    if not isinstance(state, Mapping):
        raise InceptionError(f"{pth} is not a state dict")
    tensors = {
        k.removeprefix("module."): v.detach().float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)
    }
    layout = _flax_layout()
    params_from_torch(tensors, where=str(pth))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: np.ascontiguousarray(v) for k, v in tensors.items() if k in layout}
    save_file(kept, str(out), metadata={"format": "microforge-fid-inception-2015-12-05"})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m microforge_jax.eval.inception", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--convert", type=Path, required=True, metavar="PTH", help="pytorch-fid's FID Inception .pth")
    parser.add_argument("--out", type=Path, required=True, metavar="SAFETENSORS", help="the weights file to write")
    args = parser.parse_args(argv)
    out = convert(args.convert, args.out)
    print(f"wrote {out} ({len(_flax_layout())} tensors)")
    return 0


if __name__ == "__main__":
    from microforge_jax.cli import run  # noqa: PLC0415

    sys.exit(run(main))
