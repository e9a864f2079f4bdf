"""The Arrow backend: two slots per sample in a memory-mapped Arrow file and a slot bit per
sample, so a checkpoint of epoch n stays valid until epoch n + 1 (docs/store.md, "Crash
consistency (Arrow)")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .arrow_file import StoreFile, create_store_file
from .base import EstimateStore, pack_bits
from .checksums import read_verified, row_checksums, state_checksums
from .common import StoreError
from .tables import CHUNK_BYTES, FileTable, fill_rows

log = logging.getLogger(__name__)


class ArrowStore(EstimateStore):
    """Estimates in a memory-mapped Arrow IPC file, two slots per sample (docs/store.md)."""

    backend = "arrow"
    needs_epoch_checkpoint = True

    def __init__(self, *, path, num_samples, sample_shape, dtype, seed, fingerprint, device, rank=0,
                 world_size=1, resume: bool = False):
        super().__init__(num_samples=num_samples, sample_shape=sample_shape, dtype=dtype, seed=seed,
                         fingerprint=fingerprint, device=device, rank=rank, world_size=world_size)
        self.path = Path(path)
        self._slot = np.zeros(self.num_owned, dtype=np.uint8)
        self._sums = np.zeros((2, self.num_owned), dtype=np.uint32)  # CRC-32 of each slot's rows
        self._file: StoreFile | None = None
        if resume:
            self._awaiting_state = True
            if self.path.exists():
                self._file = StoreFile(self.path, self._meta(), self._dtype, writable=True)
            # else: created by load_state_dict from a device checkpoint (an Arrow one names a file)
        else:
            if self.path.exists():
                raise StoreError(f"{self.path}: a store file already exists; resume from the checkpoint that "
                                 f"refers to it (resume=True) or delete it to start with fresh estimates")
            self._create(self._initial_source())

    def _summed(self, source):
        """`source` that also records the checksums of the rows it gives, as slot 0's."""
        def summed(start: int, end: int) -> torch.Tensor:
            rows = source(start, end)
            self._sums[0, start:end] = row_checksums(rows)
            return rows
        return summed

    def _create(self, source) -> None:
        create_store_file(self.path, self._meta(), self._dtype, self.sample_shape,
                          self.owned.numpy(), self._summed(source))
        self._file = StoreFile(self.path, self._meta(), self._dtype, writable=True)

    @property
    def file_id(self) -> str | None:
        return None if self._file is None else self._file.file_id

    @property
    def nbytes(self) -> int:
        return 2 * self.num_owned * self.row_numel * self._dtype.itemsize

    def describe(self) -> str:
        return str(self.path)

    def _tables(self) -> list[FileTable]:
        if self._file is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self._file.tables

    def _read(self, local):
        return read_verified(self.path, self._tables(), local, self._slot[local], self._sums, self.owned)

    def _latest(self, local):
        slots = self._slot[local] ^ self._written[local]
        return read_verified(self.path, self._tables(), local, slots, self._sums, self.owned)

    def _write(self, rows, values):
        tables = self._tables()
        target = 1 - self._slot[rows]
        values = values.cpu()
        sums = row_checksums(values)
        first = int(target[0])
        if (target == first).all():
            tables[first].put(rows, values)
        else:
            for s in (0, 1):
                pick = np.flatnonzero(target == s)
                tables[s].put(rows[pick], values[torch.from_numpy(pick)])
        self._sums[target, rows] = sums

    def _advance(self) -> None:
        self._slot ^= self._written.astype(np.uint8)

    def _update_mirror(self) -> None:
        if self._file is not None and self._file.writable:
            self._file.set_latest(self._slot ^ self._written)

    def flush(self) -> None:
        if self._file is not None and self._file.writable:
            self._update_mirror()
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            if not self._awaiting_state:
                self.flush()
            self._file.close()
            self._file = None

    def _backend_state(self) -> dict:
        return {"path": str(self.path.resolve()), "file_id": self.file_id, "slot": pack_bits(self._slot),
                "checksums": torch.from_numpy(self._sums.astype(np.int64))}

    def _load_from_arrow(self, state, slot, written):
        if self._file is None:
            raise StoreError(f"{self.path}: missing, but the checkpoint's estimates are in this Arrow file "
                             f"({state['path']}, id {state['file_id']})")
        if state["file_id"] != self._file.file_id:
            raise StoreError(f"{self.path}: file id {self._file.file_id} is not the store file the checkpoint "
                             f"refers to ({state['path']}, id {state['file_id']}); the estimates that "
                             f"checkpoint needs are gone -- start a new run")
        sums = state_checksums(state, self.num_owned, str(self.path))
        self._verify_needed(slot, written, sums)
        self._slot[:] = slot
        self._sums[:] = sums

    def _verify_needed(self, slot: np.ndarray, written: np.ndarray, sums: np.ndarray) -> None:
        """Check every estimate the checkpoint needs against its checksum: each row's newest one (the
        slot written in the checkpoint's epoch, else the one read from); the other slot is not read
        again before it is overwritten."""
        tables, newest = self._tables(), slot ^ written
        step = max(1, CHUNK_BYTES // (self.row_numel * self._dtype.itemsize))
        for start in range(0, self.num_owned, step):
            rows = np.arange(start, min(self.num_owned, start + step))
            read_verified(self.path, tables, rows, newest[rows], sums, self.owned)
        log.info("%s: the estimates the checkpoint needs match their checksums", self.path)

    def _load_from_device(self, est, written):
        source = lambda start, end: est[start:end]  # noqa: E731
        if self._file is None:
            self._create(source)
        else:
            def put(rows: slice, values):
                self._file.tables[0].put(np.arange(rows.start, rows.stop), values)
            fill_rows(put, self.num_owned, self.row_numel * self._dtype.itemsize, self._summed(source))
        # Every newest estimate is now in slot 0. Samples not yet written in the checkpoint's epoch read
        # it as their epoch-start estimate (slot bit 0); for written ones the bit is 1, so slot 0 is
        # their "written this epoch" slot -- their epoch-start value is not needed (never gathered again).
        self._slot[:] = written.astype(np.uint8)
        log.info("%s: filled from the checkpoint's device-store estimates", self.path)
