"""Cached VAE latents for the flow stage (`train.flow.cache_latents = True`).

The VAE is frozen during flow training, so the encoder's posterior of a training image never
changes: `LatentCache` computes it once per image and hands the flow step the posterior's
`latent_mean` and `latent_logvar` instead of the image. Moments, not a sample: the step still draws
`z0 = mean + exp(logvar / 2) * eps` with fresh noise every step (`train_steps.batch_latents`),
exactly as when it encodes the image itself, so training sees the same distribution (for the same
seed, the same losses up to float rounding); caching one sample would freeze the posterior noise.

When it helps: only when records repeat. The built-in shapes world renders a new scene for every
record index (a million per epoch), so there the cache only grows; it pays off on a finite
dataset (`data.source = "folder"`) from its second epoch on, where every step skips the VAE
encoder. Entries are keyed by a digest of the image's pixels (the shuffled, per-process Grain
records carry no index, and the latent depends on the pixels only), live on the host as fp32
numpy — 2 x h x w x C x 4 bytes per image (8 KB for a 16x16x4 latent, 16 KB for 8x8x32) —
and are per process (each process caches the records it reads). The misses of a batch are
encoded on this process's first device (the whole local batch at once: one compiled shape).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from microforge_jax import sharding

Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class LatentCache:
    """Posterior moments (mean, logvar) of the frozen VAE per training image, each computed once.

    Args:
      encode: images (B, H, W, 3) in [-1, 1] -> (mean, logvar), numpy, (B, h, w, C) each.
    """

    def __init__(self, encode: Encoder):
        self.encode = encode
        self._index: dict[bytes, int] = {}
        self._mean: list[np.ndarray] = []
        self._logvar: list[np.ndarray] = []
        self.hits = 0  # images found in the cache
        self.misses = 0  # images that had to be encoded

    def __len__(self) -> int:
        return len(self._index)

    @staticmethod
    def key(image_HxWx3: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image_HxWx3).tobytes(), digest_size=16).digest()

    def lookup(self, images_BxHxWx3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar) of every image, encoding the batch once if any of them is new."""
        images = np.asarray(images_BxHxWx3)
        keys = [self.key(row) for row in images]
        new = [k not in self._index for k in keys]
        if any(new):
            mean, logvar = self.encode(images)
            for j, k in enumerate(keys):
                if new[j] and k not in self._index:  # (a picture twice in one batch: one entry)
                    self._index[k] = len(self._mean)
                    self._mean.append(np.array(mean[j], np.float32))  # copies: the batch arrays can go
                    self._logvar.append(np.array(logvar[j], np.float32))
        self.misses += sum(new)
        self.hits += len(keys) - sum(new)
        rows = [self._index[k] for k in keys]
        return np.stack([self._mean[i] for i in rows]), np.stack([self._logvar[i] for i in rows])

    def summary(self) -> str:
        total = self.hits + self.misses
        return f"{len(self)} images cached, {self.hits}/{total} lookups hit"


def vae_encoder(vae: Any, vae_params: Any, mesh_axes: tuple[str, ...], rules: Any) -> Encoder:
    """The frozen VAE's posterior moments, jitted on this process's first device (outside the training mesh)."""
    device = jax.local_devices()[0]
    one_device = sharding.make_mesh(mesh_axes, (1,) * len(mesh_axes), [device])
    params = jax.device_put(vae_params, device)

    @jax.jit
    def moments(p: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        posterior = vae.apply(p, x, method=vae.encode)
        return posterior.mean, posterior.logvar

    def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with sharding.use_mesh(one_device, rules):  # the VAE's logical constraints, on one device
            return jax.device_get(moments(params, jax.device_put(np.asarray(images, np.float32), device)))

    return encode
