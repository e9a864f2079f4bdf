"""Batched generation with any method's sampler: sample i's noise depends only on (seed, i), so
the output is the same for any batch size or device, and only one batch is on the device at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from .methods import Method
from .progress import progress as progress_bar


def sample_batches(method: Method, net, num_samples: int, shape: tuple[int, ...], steps: int,
                   batch_size: int, device: torch.device | str = "cpu",
                   progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield CPU float32 batches in [-1, 1] of `steps`-step samples of `method`."""
    if steps < 1:
        raise ValueError(f"steps: {steps} must be >= 1")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
    was_training = net.training
    net.eval()
    try:
        with progress_bar(num_samples, f"sampling {method.name} ({steps}-step)", unit="img",
                          disable=not progress) as bar:
            for start in range(0, num_samples, batch_size):
                idx = torch.arange(start, min(start + batch_size, num_samples))
                with torch.inference_mode():
                    batch = method.generate(net, idx, shape, steps, device).float().cpu()
                bar.update(len(idx))
                yield batch
    finally:
        net.train(was_training)


def sample(method: Method, net, num_samples: int, shape: tuple[int, ...], steps: int,
           batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """All samples as one CPU tensor (num_samples, *shape) in [-1, 1]."""
    return torch.cat(list(sample_batches(method, net, num_samples, shape, steps, batch_size, device, progress)))
