"""Improved precision and recall (Kynkaenniemi et al. 2019): k-nearest-neighbour manifolds of
real and generated features, in memory-bounded blocks."""

from __future__ import annotations

import numpy as np
import torch

_BLOCK_BYTES = 64 << 20  # the largest distance block of the k-NN computations


def _block_rows(n_cols: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(1, n_cols)))


def knn_radii(features: np.ndarray | torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (blocked, memory-bounded)."""
    f = torch.as_tensor(features, dtype=torch.float32)
    if k < 1 or len(f) < k + 1:
        raise ValueError(f"features: {len(f)} rows are too few for k={k} nearest neighbours")
    rows = _block_rows(len(f))
    out = torch.empty(len(f))
    for i in range(0, len(f), rows):
        d = torch.cdist(f[i:i + rows], f)
        out[i:i + rows] = d.kthvalue(k + 1, dim=1).values  # the 1st is the row itself, at 0
    return out


def _inside(query: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query row: is it within radii[j] of some points[j]?"""
    rows = _block_rows(len(points))
    out = torch.empty(len(query), dtype=torch.bool)
    for i in range(0, len(query), rows):
        out[i:i + rows] = (torch.cdist(query[i:i + rows], points) <= radii[None, :]).any(dim=1)
    return out


def precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor,
                     k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN radii."""
    real = torch.as_tensor(real_features, dtype=torch.float32)
    fake = torch.as_tensor(fake_features, dtype=torch.float32)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features, fake_features: expected (N, D) and (M, D), got "
                         f"{tuple(real.shape)}, {tuple(fake.shape)}")
    precision = _inside(fake, real, knn_radii(real, k)).float().mean().item()
    recall = _inside(real, fake, knn_radii(fake, k)).float().mean().item()
    return precision, recall
