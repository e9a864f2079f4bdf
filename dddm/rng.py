"""Counter-based randomness: every draw for sample i depends only on a key and i.

The key is (seed, stream[, epoch]). So initial x0 estimates, training noise and sampler
noise are the same whatever the number of processes, the batch size, the device, or
whether the run was interrupted and resumed.
"""

from __future__ import annotations

import numpy as np
import torch

# Streams keep draws for different purposes independent under the same seed.
STREAM_INITIAL_ESTIMATE = 0
STREAM_SAMPLE_ESTIMATE = 1
STREAM_SAMPLE_PRIOR = 2
STREAM_TRAIN_NOISE = 3
STREAM_EPOCH_ORDER = 4
STREAM_SAMPLE_STEP = 5  # the re-noising of multistep samplers, keyed by step


def _generators(indices: torch.Tensor, key: tuple[int, ...]):
    for index in indices.tolist():
        yield generator(*key, index)


def normal_per_index(indices: torch.Tensor, shape: tuple[int, ...], *key: int) -> torch.Tensor:
    """Standard normal float32 (len(indices), *shape) on the CPU; row k drawn from (*key, indices[k])."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, gen in enumerate(_generators(indices, key)):
        out[row] = torch.randn(shape, generator=gen)
    return out


def timestep_and_noise_per_index(indices: torch.Tensor, shape: tuple[int, ...], T: int,
                                 *key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U{1..T} (long) and eps ~ N(0, I) (float32) per sample, on the CPU, from (*key, index)."""
    t = torch.empty(len(indices), dtype=torch.long)
    eps = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, gen in enumerate(_generators(indices, key)):
        t[row] = torch.randint(1, T + 1, (1,), generator=gen)
        eps[row] = torch.randn(shape, generator=gen)
    return t, eps


def uniform_and_noise_per_index(indices: torch.Tensor, shape: tuple[int, ...],
                                *key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u ~ U[0, 1) (float64) and eps ~ N(0, I) (float32) per sample, on the CPU, from (*key, index):
    methods map u to their own noise level (an inverse CDF), so the draw stays per index."""
    u = torch.empty(len(indices), dtype=torch.float64)
    eps = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, gen in enumerate(_generators(indices, key)):
        u[row] = torch.rand(1, dtype=torch.float64, generator=gen)
        eps[row] = torch.randn(shape, generator=gen)
    return u, eps


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from the key alone (for per-epoch shuffles)."""
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
