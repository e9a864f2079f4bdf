"""Which rank owns which training samples' estimates, their initial values, and the sizes and
file names that follow from that (docs/store.md, "Keys and ownership")."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..rng import STREAM_INITIAL_ESTIMATE, normal_per_index
from .common import StoreError, storage_dtype


def owned_indices(num_samples: int, rank: int, world_size: int) -> torch.Tensor:
    """The dataset indices rank `rank` owns for the whole run: rank, rank + W, rank + 2W, ...
    (ascending, int64). The ranks' sets are disjoint and together cover range(num_samples);
    their sizes differ by at most one."""
    check_world(num_samples, rank, world_size)
    return torch.arange(rank, num_samples, world_size, dtype=torch.long)


def count_owned(num_samples: int, rank: int, world_size: int) -> int:
    return max(0, (num_samples - rank + world_size - 1) // world_size)


def check_world(num_samples: int, rank: int, world_size: int) -> None:
    if num_samples < 1:
        raise StoreError(f"num_samples must be positive, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreError(f"rank {rank} is not in a world of size {world_size}")


def initial_estimates(indices, sample_shape, seed: int) -> torch.Tensor:
    """The initial estimates N(0, I), float32 on the CPU, row k drawn from (seed, indices[k]) alone:
    the same whichever rank, batch or backend asks."""
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
    return normal_per_index(indices, tuple(int(s) for s in sample_shape), int(seed), STREAM_INITIAL_ESTIMATE)


def store_path(directory, rank: int = 0) -> Path:
    """The Arrow file of rank `rank` in the store directory."""
    return Path(directory) / f"x0_est-rank{rank}.arrow"


def store_nbytes(num_samples: int, sample_shape, dtype, rank: int = 0, world_size: int = 1) -> int:
    """Bytes one copy of rank `rank`'s estimates takes (the device backend's footprint)."""
    return count_owned(num_samples, rank, world_size) * math.prod(sample_shape) * storage_dtype(dtype).itemsize
