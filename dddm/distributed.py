"""Process-group helpers: one process per GPU under torchrun (nccl), or gloo on CPU.

A plain `python` launch (no torchrun environment) is a world of one with no process group.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import lifeline
from .compute import resolve_device


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def all_nodes_here(tc, endpoint: str | None) -> bool:
    """Several nodes that are all this machine: a rendezvous on loopback (a rehearsal, the tests)."""
    return tc.nnodes > 1 and endpoint is not None and is_loopback(endpoint.rpartition(":")[0])


def processes_per_machine(tc, endpoint: str | None) -> int:
    """The training processes that share this machine's cores: `train.nproc`, or every node's when all the
    nodes are this machine."""
    return tc.nproc * (tc.nnodes if all_nodes_here(tc, endpoint) else 1)


def torchrun_args(nproc: int, nnodes: int = 1, endpoint: str | None = None, run_id: str = "dddm",
                  timeout_s: int = 600) -> list[str]:
    """torchrun's options for `nproc` workers on each of `nnodes` nodes. One node: the `loopback`
    rendezvous (dddm/rendezvous.py) keeps every listener on 127.0.0.1. Several: torchrun's c10d rendezvous
    at `endpoint`, each node waiting `timeout_s` for the others (joining, and reaching the endpoint)."""
    if nnodes == 1:
        rendezvous = ["--rdzv-backend=loopback", f"--rdzv-endpoint={LOOPBACK}:0"]
    else:
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
                      f"--rdzv-conf=join_timeout={timeout_s},read_timeout={timeout_s}"]
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", *rendezvous]


def torchrun_command(nproc: int, **rendezvous) -> list[str]:
    """torchrun as a command line (tests, benchmarks); the train stage runs its agent in pipeline.launch."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, **rendezvous)]


def init(device_preference: str = "auto", timeout_s: int = 600) -> World:
    """Join the torchrun process group if launched by torchrun, else a world of one. A collective waits
    `timeout_s` (rendezvous.timeout) for the other ranks, not torch's 30 minutes."""
    lifeline.die_with_launcher()  # again: a worker entry point that did not call it first
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, world_size, local_rank, device)


# how gloo and NCCL say that a collective waited out the process group's timeout (a RuntimeError, no subclass)
TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout")
CHECK_IN_S = 5  # how long a rank that timed out waits for the others to say they did too


def peer_timeout(error: BaseException, timeout_s: int) -> str | None:
    """When `error` is a collective's timeout, one line naming the ranks that did not answer; else None. The live
    ranks time out together (they entered the collective together) and check in through the process group's
    store; those that do not within CHECK_IN_S are the stopped, hung or lost ones."""
    if not (dist.is_initialized() and isinstance(error, RuntimeError) and any(t in str(error) for t in TIMED_OUT)):
        return None
    rank, size = dist.get_rank(), dist.get_world_size()
    waited = f"rank {rank} of {size}: a collective waited rendezvous.timeout={timeout_s} s"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=CHECK_IN_S))  # its host may be what is lost
        store.set(f"dddm/timed-out/{rank}", "1")
        deadline = time.monotonic() + CHECK_IN_S
        while silent := [r for r in range(size) if not store.check([f"dddm/timed-out/{r}"])]:
            if time.monotonic() > deadline:
                return (f"{waited} for rank(s) {', '.join(map(str, silent))}, which did not answer "
                        "(stopped, hung, or its node lost); a rerun resumes from the last checkpoint")
            time.sleep(0.1)
    except RuntimeError as e:  # the store's host, node 0's agent, is gone too
        return f"{waited}, and the rendezvous store does not answer either ({str(e).splitlines()[0]})"
    return f"{waited} on every rank: one was busy longer than that between collectives"


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
