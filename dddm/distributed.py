"""Process-group helpers: one process per GPU under torchrun (nccl), or gloo on CPU.

A plain `python` launch (no torchrun environment) is a world of one with no process group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error naming `train.device`."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


LOOPBACK = "127.0.0.1"


def torchrun_command(nproc: int) -> list[str]:
    """torchrun for `nproc` workers on this machine, as dvc.yaml's train stage runs it: the `loopback`
    rendezvous (dddm/rendezvous.py) keeps every listener on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv-backend=loopback", f"--rdzv-endpoint={LOOPBACK}:0"]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def kill_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_launcher() -> None:
    """Under torchrun (Linux): SIGKILL this worker when the torchrun agent dies. torchrun starts its
    workers in new sessions, so a kill -9 of the launching process group (dvc repro, torchrun) would
    otherwise leave them training as orphans next to the trainer a rerun starts."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    kill_with_parent()
    # The launcher may have died before the prctl: then this process was re-parented already.
    try:
        launcher = b"torch" in Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        launcher = False
    if os.getppid() != parent or not launcher:
        raise SystemExit(f"worker {os.getpid()}: its torchrun launcher is gone (parent is now pid {os.getppid()})")


def init(device_preference: str = "auto") -> World:
    """Join the torchrun process group if launched by torchrun, else a world of one."""
    die_with_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (small, picklable values such as RNG states)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
