"""Where one rank's estimates live: `open_store` picks the device or the Arrow backend by
policy and memory budget, and logs why."""

from __future__ import annotations

import logging

import psutil
import torch

from .arrow import ArrowStore
from .base import EstimateStore
from .common import StoreError, fmt_bytes, storage_dtype
from .device import DeviceStore
from .ownership import check_world, count_owned, store_nbytes, store_path

log = logging.getLogger(__name__)

POLICIES = ("auto", "device", "arrow")


def _budget(device: torch.device, fraction: float) -> tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(fraction * free), f"{fraction:g} x free GPU memory {fmt_bytes(free)}"
    available = psutil.virtual_memory().available
    return int(fraction * available), f"{fraction:g} x available RAM {fmt_bytes(available)}"


def open_store(policy: str, directory, num_samples: int, sample_shape, dtype, seed: int, fingerprint: str,
               device, rank: int = 0, world_size: int = 1, budget_fraction: float = 0.5,
               resume: bool = False) -> EstimateStore:
    """The x0 store of rank `rank`, on the backend `policy` asks for (auto: the device unless the
    store exceeds `budget_fraction` of free device memory / available RAM). The Arrow file is
    `store_path(directory, rank)`. resume=False creates fresh estimates and refuses an existing
    file; resume=True expects `load_state_dict` of the checkpoint's store state next (an existing
    file is validated now; under auto it keeps the run on the Arrow backend)."""
    if policy not in POLICIES:
        raise StoreError(f"store policy {policy!r}: expected one of {POLICIES}")
    if not 0 < budget_fraction <= 1:
        raise StoreError(f"store budget_fraction must be in (0, 1], got {budget_fraction}")
    device = torch.device(device)
    check_world(num_samples, rank, world_size)
    path = store_path(directory, rank)
    need = store_nbytes(num_samples, sample_shape, dtype, rank, world_size)
    shape_txt = "x".join(str(int(s)) for s in sample_shape)
    sizes = (f"{count_owned(num_samples, rank, world_size)} of {num_samples} samples x {shape_txt} "
             f"{storage_dtype(dtype).name} = {fmt_bytes(need)}")
    backend, why = policy, f"policy {policy}"
    if policy == "auto":
        budget, budget_txt = _budget(device, budget_fraction)
        if path.exists():
            if not resume:
                raise StoreError(f"{path}: a store file already exists; resume from the checkpoint that refers "
                                 f"to it (resume=True) or delete it to start with fresh estimates")
            backend, why = "arrow", f"auto, resuming the existing file; budget {fmt_bytes(budget)} = {budget_txt}"
        else:
            backend = "device" if need <= budget else "arrow"
            why = f"auto, budget {fmt_bytes(budget)} = {budget_txt}"
    where = f"{device}" if backend == "device" else f"{path} ({fmt_bytes(2 * need)} in the file: two slots)"
    log.info("x0 store, rank %d of %d: %s -> %s on %s (%s)", rank, world_size, sizes, backend, where, why)
    common = dict(num_samples=num_samples, sample_shape=sample_shape, dtype=dtype, seed=seed,
                  fingerprint=fingerprint, device=device, rank=rank, world_size=world_size, resume=resume)
    if backend == "device":
        return DeviceStore(**common)
    return ArrowStore(path=path, **common)
