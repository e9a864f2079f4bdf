"""Where a process computes: its device, and its CPU threads (a run's results depend on their count).

Kept apart from the process-group helpers (dddm/distributed.py) because the data stages use it too: an edit
to the training's machinery reruns no data stage.
"""

from __future__ import annotations

import os

import psutil
import torch


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error naming `train.device`."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def threads_per_process(setting: int | str, processes: int = 1) -> int:
    """`train.threads` as a number. CPU kernels sum in an order that depends on the thread count, so the count
    is part of what a run is (its identity): `auto` is OMP_NUM_THREADS where set, else this machine's
    physical cores (those this process may use) shared by its `processes`."""
    if setting != "auto":
        return int(setting)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    usable = len(os.sched_getaffinity(0))
    cores = min(usable, psutil.cpu_count(logical=False) or usable)
    return max(1, cores // processes)


def use_threads(threads: int) -> None:
    """This process's intra-op threads, and its children's (torchrun's workers read OMP_NUM_THREADS)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
