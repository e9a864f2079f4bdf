"""Rows of estimates in host memory or in one slot of the memory-mapped store file: indexed
reads and writes in the storage dtype, the fastest way each medium allows."""

from __future__ import annotations

import mmap
import os
from typing import Callable

import numpy as np
import torch

from .common import StorageDtype, StoreError

CHUNK_BYTES = 64 << 20  # rows per chunk when creating / converting: about 64 MB


class HostTable:
    """A (rows, numel) array in host memory seen in the storage dtype (the device store on CPU)."""

    def __init__(self, array: np.ndarray, dtype: StorageDtype):
        self.array = array
        self.dtype = dtype
        self.numel = array.shape[1]
        self.tensor = torch.from_numpy(array) if array.flags.writeable else None

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """Rows as a new CPU tensor in the storage dtype (torch's index_select: the fastest here)."""
        if self.tensor is not None:
            out = self.tensor.index_select(0, torch.from_numpy(rows))
        else:
            out = torch.from_numpy(np.take(self.array, rows, axis=0))
        return out.view(self.dtype.torch)

    def put(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """Rows (unique) = values (CPU, storage dtype). numpy's assignment is several times faster
        than torch's index_copy_ on the CPU."""
        self.array[rows] = values.contiguous().view(self.dtype.bits_torch).numpy()


class FileTable:
    """One slot of the store file: its rows, in one or more record batches of `chunk_rows` rows,
    each a zero-copy view of the Arrow buffer in the memory map. Reads index the map, writes store
    into it. When the file is larger than about half the RAM (`from_disk`), most rows are not in
    the page cache: then a gather first asks the kernel for all its rows at once (madvise
    WILLNEED) instead of faulting them in one page after another, and a scatter writes with one
    pwrite per row, because a store into a mapped page that is not in memory first reads that page
    from disk (a pwrite of whole pages does not). For a file in the page cache, stores into the map
    are the faster path (measured here: also after writeback, when the first store into each page
    takes a write fault)."""

    def __init__(self, arrays: list[np.ndarray], chunk_rows: int, offsets: list[int], dtype: StorageDtype,
                 mm: mmap.mmap, fd: int | None, from_disk: bool):
        self.parts = [HostTable(a, dtype) for a in arrays]
        self.chunk_rows, self.offsets = chunk_rows, np.asarray(offsets, dtype=np.int64)
        self.dtype, self.mm, self.fd, self.from_disk = dtype, mm, fd, from_disk
        self.numel = arrays[0].shape[1]
        self.row_bytes = self.numel * dtype.itemsize

    def _file_offsets(self, rows: np.ndarray) -> np.ndarray:
        chunk = rows // self.chunk_rows
        return self.offsets[chunk] + (rows - chunk * self.chunk_rows) * self.row_bytes

    def _split(self, rows: np.ndarray):
        """(chunk, positions in rows, rows within the chunk) per record batch the rows touch."""
        chunk = rows // self.chunk_rows
        for c in np.unique(chunk).tolist():
            pos = np.flatnonzero(chunk == c)
            yield c, pos, rows[pos] - c * self.chunk_rows

    def take(self, rows: np.ndarray) -> torch.Tensor:
        if self.from_disk and len(rows):
            rb, mask = self.row_bytes, ~(mmap.PAGESIZE - 1)
            for start in np.sort(self._file_offsets(rows)).tolist():
                page = start & mask
                self.mm.madvise(mmap.MADV_WILLNEED, page, start + rb - page)
        if len(self.parts) == 1:
            return self.parts[0].take(rows)
        out = np.empty((len(rows), self.numel), dtype=self.dtype.bits)
        for c, pos, local in self._split(rows):
            out[pos] = self.parts[c].array[local]
        return torch.from_numpy(out).view(self.dtype.torch)

    def put(self, rows: np.ndarray, values: torch.Tensor) -> None:
        if self.fd is None:
            raise StoreError("the store file is open read-only")
        data = values.contiguous().view(self.dtype.bits_torch).numpy()
        if not self.from_disk:
            if len(self.parts) == 1:
                self.parts[0].array[rows] = data
            else:
                for c, pos, local in self._split(rows):
                    self.parts[c].array[local] = data[pos]
            return
        view, rb, fd = memoryview(data).cast("B"), self.row_bytes, self.fd
        starts = self._file_offsets(rows)
        for k in np.argsort(starts, kind="stable").tolist():  # ascending file offsets
            if os.pwrite(fd, view[k * rb:(k + 1) * rb], int(starts[k])) != rb:
                raise OSError(f"short write to the store file at row {int(rows[k])}")


def fill_rows(table_put: Callable[[slice, torch.Tensor], None], n: int, row_bytes: int,
               source: Callable[[int, int], torch.Tensor]) -> None:
    chunk = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        table_put(slice(start, end), source(start, end))


def read_slots(tables: list[FileTable], rows: np.ndarray, slots: np.ndarray) -> torch.Tensor:
    """tables[slots[k]][rows[k]] for every k (storage dtype, CPU)."""
    if len(rows) == 0:
        return tables[0].take(rows)
    first = int(slots[0])
    if (slots == first).all():
        return tables[first].take(rows)
    out = torch.empty((len(rows), tables[0].numel), dtype=tables[0].dtype.torch)
    for s in (0, 1):
        pick = np.flatnonzero(slots == s)
        out[torch.from_numpy(pick)] = tables[s].take(rows[pick])
    return out
