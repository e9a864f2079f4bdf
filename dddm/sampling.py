"""Algorithm 2: one-step and multi-step generation by fixed-point iteration at t = T."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from .diffusion import Diffusion
from .rng import STREAM_SAMPLE_ESTIMATE, STREAM_SAMPLE_PRIOR, normal_per_index


@torch.no_grad()
def iterate_estimates(net, diffusion: Diffusion, x0_est: torch.Tensor, x_T: torch.Tensor,
                      steps: int) -> torch.Tensor:
    """x0_est <- f_theta(x0_est, x_T, T), `steps` times, with the same x_T and t = T every time."""
    t = torch.full((x_T.shape[0],), diffusion.T, dtype=torch.long, device=x_T.device)
    for _ in range(steps):
        x0_est = diffusion.denoise(net, x0_est, x_T, t)
    return x0_est.clamp(-1.0, 1.0)


def sample_batches(net, diffusion: Diffusion, num_samples: int, shape: tuple[int, ...], steps: int,
                   seed: int, batch_size: int, device: torch.device | str = "cpu",
                   progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield CPU float32 batches in [-1, 1]; sample i's noise depends only on (seed, i), so the
    output is the same for any batch size or device, and only one batch is on the device at a time."""
    if steps < 1:
        raise ValueError(f"steps: {steps} must be >= 1")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
    was_training = net.training
    net.eval()
    try:
        starts = range(0, num_samples, batch_size)
        for start in tqdm(starts, desc=f"sampling ({steps}-step)", disable=not progress):
            idx = torch.arange(start, min(start + batch_size, num_samples))
            x0_est = normal_per_index(idx, shape, seed, STREAM_SAMPLE_ESTIMATE).to(device)
            x_T = diffusion.prior(normal_per_index(idx, shape, seed, STREAM_SAMPLE_PRIOR).to(device))
            yield iterate_estimates(net, diffusion, x0_est, x_T, steps).float().cpu()
    finally:
        net.train(was_training)


def sample(net, diffusion: Diffusion, num_samples: int, shape: tuple[int, ...], steps: int,
           seed: int, batch_size: int = 256, device: torch.device | str = "cpu",
           progress: bool = False) -> torch.Tensor:
    """All samples as one CPU tensor (num_samples, *shape) in [-1, 1]."""
    return torch.cat(list(sample_batches(net, diffusion, num_samples, shape, steps, seed,
                                         batch_size, device, progress)))
