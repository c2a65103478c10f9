"""Frechet Inception Distance: pool3 features of the FID Inception and the Frechet distance of two sets.

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

over the 2048-d features' means mu and covariances S (unbiased, as pytorch-fid), in float64.
The square root is `scipy.linalg.sqrtm` when scipy is installed (pytorch-fid's computation, with
its retry on a near-singular product); without scipy it is the eigen-decomposition form
tr((S1^(1/2) S2 S1^(1/2))^(1/2)) = sum sqrt(eig), which is the same number because S1 S2 and
S1^(1/2) S2 S1^(1/2) are similar. `fid_from_features` with fewer images than dimensions (the usual
CPU evaluation, N < 2048) computes the same trace exactly in the small space instead: with centred
features A1, A2 scaled so that S = A^T A, tr((S1 S2)^(1/2)) is the sum of the singular values of
A1 A2^T (N1 x N2), with no D x D matrix function.

FIDs are only comparable when computed the same way: this Inception matches pytorch-fid's (same
weights, same resize); torchmetrics/torch-fidelity resize like TensorFlow 1 and the original TF
code uses TF's graph, so the same images give somewhat different numbers in each.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from microforge_jax.eval import inception


def statistics(features_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) in float64; needs at least 2 rows."""
    f = np.asarray(features_NxD, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 through two symmetric eigen-decompositions."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """pytorch-fid's `calculate_frechet_distance` square root (scipy.linalg.sqrtm)."""
    from scipy import linalg  # noqa: PLC0415

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product: offset the diagonals, as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(np.real(np.trace(covmean)))  # rounding leaves a tiny imaginary part


def _have_scipy() -> bool:
    try:
        import scipy.linalg  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, method: str = "auto"
) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
      mu1, mu2: means (D,).
      sigma1, sigma2: covariances (D, D).
      method: "scipy" (sqrtm), "eigh" (numpy only) or "auto" (scipy when installed).

    Returns:
      The distance (>= 0 up to rounding).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    if method == "auto":
        method = "scipy" if _have_scipy() else "eigh"
    if method == "scipy":
        tr_covmean = _trace_sqrt_product_scipy(sigma1, sigma2)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown method {method!r}: 'auto', 'scipy' or 'eigh'")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray, *, method: str = "auto") -> float:
    """FID between two feature sets (N1, D) and (N2, D), in float64.

    Args:
      features1, features2: the sets, at least 2 rows each.
      method: "lowrank" (the singular values of A1 A2^T, see the module docstring), "scipy" or
        "eigh" (`frechet_distance` on the statistics), or "auto": lowrank when the sets are small
        against D (N1 N2 min(N1, N2) < D^3), else `frechet_distance`'s choice.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"FID needs two feature sets (N >= 2, same D), got shapes {f1.shape} and {f2.shape}")
    (n1, d), n2 = f1.shape, len(f2)
    if method == "auto" and n1 * n2 * min(n1, n2) < d**3:
        method = "lowrank"
    if method != "lowrank":
        return frechet_distance(*statistics(f1), *statistics(f2), method=method)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a1, a2 = (f1 - mu1) / np.sqrt(n1 - 1), (f2 - mu2) / np.sqrt(n2 - 1)  # S = A^T A (unbiased covariance)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2.0 * tr_covmean)


class InceptionFeatures:
    """The FID Inception with its weights, jitted: `features(uint8 images) -> (N, 2048)` float64.

    Args:
      weights: the safetensors file (`inception.load_weights`) or already loaded variables.
      batch_size: images per call (the last batch is padded: one compile per input size).
      size: the square size images are resized to (299 for FID; smaller only for tests).
    """

    def __init__(self, weights: str | Path | dict[str, Any], batch_size: int = 50, size: int = inception.FID_SIZE):
        import jax  # noqa: PLC0415

        self.variables = inception.load_weights(weights) if isinstance(weights, (str, Path)) else weights
        self.batch_size = batch_size
        self._apply = jax.jit(inception.FIDInceptionV3(resize_to=size).apply)

    def features(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """pool3 features of uint8 RGB images (N, H, W, 3) (any size: each is resized to 299)."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {x.dtype} {x.shape}")
        out = []
        bs = max(1, min(self.batch_size, len(x)))
        for i in range(0, len(x), bs):
            chunk = x[i : i + bs].astype(np.float32) / 255.0  # [0, 1], as pytorch-fid's ToTensor
            n = len(chunk)
            if n < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - n, *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(self._apply(self.variables, chunk), np.float64)[:n])
        return np.concatenate(out) if out else np.zeros((0, inception.FEATURES))
