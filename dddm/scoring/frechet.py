"""The Frechet distance between two Gaussians and the feature statistics it is computed from."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from ..files import atomic_open


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    As pytorch-fid / TTUR: if the product is singular (non-finite square root), eps is added
    to both diagonals; a complex square root is accepted only when the imaginary part of its
    diagonal is numerical noise (atol 1e-3), and its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1, mu2: expected two vectors of the same length, got {mu1.shape}, {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1, sigma2: expected ({d}, {d}), got {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"frechet_distance: the square root of sigma1 sigma2 has an imaginary component {m}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@dataclass(frozen=True)
class FeatureStats:
    """Mean and unbiased covariance (float64) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray, *, name: str = "features") -> FeatureStats:
        """Statistics of (N, D) features; N >= D + 1 so the covariance is not singular."""
        f = np.asarray(features)
        if f.ndim != 2:
            raise ValueError(f"{name}: expected (N, D) features, got shape {f.shape}")
        n, d = f.shape
        check_count(n, d, name=name)
        f = f.astype(np.float64)
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=n)

    def frechet_distance(self, other: FeatureStats) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> Path:
        """Write mu, sigma, n to `path` (.npz), atomically."""
        path = Path(path)
        with atomic_open(path) as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: reference statistics not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma, n = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), int(z["n"])
        except Exception as e:  # noqa: BLE001 - any failure to read means a bad file
            raise ValueError(f"{path}: not a feature statistics file with mu, sigma, n ({e})") from e
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or n < 2:
            raise ValueError(f"{path}: inconsistent statistics (mu {mu.shape}, sigma {sigma.shape}, n {n})")
        return cls(mu=mu, sigma=sigma, n=n)


def check_count(n: int, dim: int, *, name: str = "samples", network: str = "") -> None:
    """Raise unless n >= dim + 1: below that the covariance of dim-d features is singular."""
    if n < 2:
        raise ValueError(f"{name}: at least 2 images are needed, got {n}")
    if n < dim + 1:
        where = f" in the {dim}-d {network} feature space" if network else f" of {dim}-d features"
        raise ValueError(
            f"{name}: {n} images are too few for a Frechet distance{where}: the covariance is singular "
            f"below {dim + 1} samples (rank <= N - 1); use at least {dim + 1} (50000 for paper comparisons)")
