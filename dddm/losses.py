"""The metrics d(x, y) and the adaptive uDDDM loss (Eq. 3 and 4 of the uDDDM paper)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("pseudo_huber", "l2", "l1")


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """d(x, y) = sqrt(||x - y||_2^2 + c^2) - c over each whole sample vector; shape (B,)."""
    sq = (x - y).float().flatten(1).square().sum(dim=1)
    return (sq + c * c).sqrt() - c


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample; shape (B,)."""
    return (x - y).float().flatten(1).square().mean(dim=1)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample; shape (B,)."""
    return (x - y).float().flatten(1).abs().mean(dim=1)


def metric_fn(name: str, c: float):
    """The per-sample metric d named in params (`loss.metric`)."""
    if name == "pseudo_huber":
        if not c > 0:
            raise ValueError(f"huber_c: {c!r} must be > 0")
        return lambda x, y: pseudo_huber(x, y, c)
    if name == "l2":
        return l2
    if name == "l1":
        return l1
    raise ValueError(f"metric: {name!r} is not one of {METRICS}")


def adaptive_weight(n: int) -> float:
    """w = 1 / (n + 1) for n counted from 0 (the epoch, or the step): all guide at first, ever more
    self-consistency."""
    if n < 0:
        raise ValueError(f"n: {n} must be >= 0")
    return 1.0 / (n + 1)


@dataclass
class LossTerms:
    total: torch.Tensor      # scalar, differentiable
    guide: torch.Tensor      # scalar, batch mean of d(pred, x0)
    iterative: torch.Tensor  # scalar, batch mean of d(pred, x0_est)
    weight: float


def udddm_loss(pred: torch.Tensor, x0: torch.Tensor, x0_est: torch.Tensor, n: int, d) -> LossTerms:
    """L = w d(pred, x0) + (1 - w) d(pred, x0_est), w = 1 / (n + 1), averaged over the batch."""
    w = adaptive_weight(n)
    guide = d(pred, x0).mean()
    iterative = d(pred, x0_est).mean()
    return LossTerms(total=w * guide + (1.0 - w) * iterative, guide=guide, iterative=iterative, weight=w)
