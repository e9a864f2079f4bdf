"""Row checksums of the Arrow store's estimates: a CRC-32 of each row's stored bytes, kept in
host memory per slot and in every checkpoint, verified on every read and on resume, so a damaged
store file stops the run with its name instead of training on (docs/store.md, "Corruption")."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .common import StoreError
from .tables import FileTable, read_slots


LOST = ("The estimates this run needs are lost, and no checkpoint of it can be resumed: start the run afresh "
        "with train.resume=never (it replaces the store file and the checkpoints).")


def row_checksums(rows: torch.Tensor) -> np.ndarray:
    """CRC-32 of each row's bytes, uint32 (k,); `rows` is (k, numel) on the CPU, storage dtype."""
    data = rows.contiguous().view(torch.uint8).numpy().reshape(len(rows), -1)
    return np.fromiter((zlib.crc32(row) for row in data), dtype=np.uint32, count=len(rows))


def state_checksums(state: dict, num_owned: int, where: str) -> np.ndarray:
    """The (2, num_owned) uint32 row checksums an Arrow checkpoint state carries."""
    sums = state.get("checksums")
    sums = None if sums is None else torch.as_tensor(sums).cpu().numpy()
    if sums is None or sums.shape != (2, num_owned):
        found = "none" if sums is None else f"shape {sums.shape}"
        raise StoreError(f"{where}: the checkpoint's store state holds row checksums of {found}, expected "
                         f"(2, {num_owned})")
    return sums.astype(np.uint32)


def read_verified(path, tables: list[FileTable], rows: np.ndarray, slots: np.ndarray, sums: np.ndarray,
                  owned: torch.Tensor) -> torch.Tensor:
    """tables[slots[k]][rows[k]] for every k (as `read_slots`), each row checked against its
    checksum sums[slots[k], rows[k]]; a mismatch raises StoreError naming the file."""
    slots = slots.astype(np.uint8, copy=False)  # an index, not a mask
    values = read_slots(tables, rows, slots)
    bad = np.flatnonzero(row_checksums(values) != sums[slots, rows])
    if len(bad):
        k = bad[0]
        raise StoreError(f"{path}: the x0 store file is damaged: {len(bad)} of {len(rows)} estimates read do not "
                         f"match their checksums (first: dataset index {int(owned[rows[k]])}, column "
                         f"est_{int(slots[k])}). {LOST}")
    return values
