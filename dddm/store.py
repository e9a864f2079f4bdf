"""The per-sample x0 estimate store: one estimate per training sample, on the device or in an Arrow file.

uDDDM keeps `x0_est[i]` for every training sample i, reads it when i is visited and writes the
model's new prediction back (Algorithm 1). This module holds those estimates for one process
(rank): `gather(indices)` returns float32 estimates on the training device, `scatter(indices,
values)` stores new ones, in the storage dtype chosen by the run (float32, float16, bfloat16).

Backends (`open_store` chooses; `store.policy` = auto | device | arrow):
- `DeviceStore`: one tensor on the training device (GPU memory, or RAM when training on CPU).
- `ArrowStore`: an uncompressed Arrow IPC file on local disk, memory-mapped and updated in place.
  Reads and writes index the mapped Arrow buffers directly (zero-copy views, no
  deserialisation). When the file is larger than about half the available RAM, a gather first
  asks the kernel for all its rows at once (madvise WILLNEED) and a scatter writes with one
  `pwrite` per row, which never reads the page it replaces (see `_FileTable`). The file stays a
  valid Arrow file that `pyarrow.ipc.open_file` (or any Arrow reader) opens at any time.
`auto` takes the device unless the store would exceed `budget_fraction` of the free GPU memory
(CPU: of the available RAM), and logs the decision with the sizes.

Keys and ownership. Estimates are keyed by dataset index. Rank r of a world of W owns the
indices r, r + W, r + 2W, ... (`owned_indices`) for the whole run and stores only those: no
estimate ever crosses processes, and the ranks' stores cover the dataset exactly once. The
training loop shards the data with the same function. Initial values are N(0, I), drawn per
dataset index from (seed, index) (`initial_estimates`), so they do not depend on the number of
processes, on the batch, or on the backend.

Epochs. The training loop calls `begin_epoch(n)` at the start of every epoch, then per batch
`gather(idx)` ... `scatter(idx, pred)`. Within an epoch a sample may be scattered any number of
times (the last write wins) but it may not be gathered again after its first scatter of the
epoch: such a gather raises `StoreError`. Under that contract "the estimate from the previous
visit" is well defined, and both backends return exactly the same values:
- `DeviceStore` keeps a single buffer updated in place (half the memory of two buffers);
- `ArrowStore` keeps two buffers per sample (Arrow columns `est_0`, `est_1`) and a slot bit per
  sample: during epoch n, reads come from the sample's slot (its estimate as of the start of
  epoch n, i.e. written in epoch n-1 or the initial noise), writes go to the other slot, and
  `begin_epoch(n + 1)` flips the bit of every sample written in epoch n. A sample that is not
  visited in an epoch keeps its estimate (no copy needed). When every sample is visited every
  epoch -- what the training loop does -- all bits are equal and this is plain double buffering
  by epoch parity.
Both backends also keep one "written this epoch" bit per owned sample, in host memory.

Crash consistency (Arrow). A checkpoint stores `state_dict()`: the epoch, the slot bits and the
written bits (a few bits per sample), and the file's identity; `state_dict()` first syncs the
file (fdatasync), so the checkpoint refers to data on disk (`begin_epoch` does not sync: the
epoch-end checkpoint just before it does). The data that checkpoint needs -- for each sample
the slot it read from, plus the other slot for samples already written in that epoch -- is never
touched for the rest of that epoch: writes after the checkpoint only go to the free slot of samples
not yet written (a resumed run rewrites them, deterministically, as the crashed run did; a value
the crashed run left there is never read, because the checkpoint's written bit for it is 0). So a
run killed at any moment in epoch n and resumed from a checkpoint of epoch n continues from
estimates consistent with its weights. Epoch n + 1 writes into the slots epoch n read from, so a
checkpoint of epoch n survives only until then: the Arrow store needs a checkpoint at the end of
every epoch (after its last scatter, before `begin_epoch(n + 1)`), which it announces with
`needs_epoch_checkpoint = True` (and it logs a warning when a checkpointing run skips one). The
file is created as `<name>.tmp` and renamed when complete, so a crash while creating it leaves no
half-written store. (A sample scattered twice in one epoch with a checkpoint between the two
scatters is not covered; the training loop scatters each sample once per epoch.)

Crash consistency (device). The device buffer dies with the process, so `state_dict()` carries a
CPU copy of the estimates, in the storage dtype (plus the written bits); `load_state_dict()`
restores it. A checkpoint taken mid-epoch holds the in-place buffer as it was (estimates of epoch
n for samples already visited, of epoch n-1 for the others), which is exactly the state an
uninterrupted run has at that point, so resuming gives the same estimates.

A checkpoint's store state can be loaded into either backend (the estimates are converted), so an
`auto` run may resume on a different backend when the free memory changed: a device checkpoint
fills a new or existing Arrow file, an Arrow checkpoint is read from the file it names.

Duplicates. `gather` with repeated indices returns the same estimate for each repetition.
`scatter` with repeated indices keeps the value at the LAST occurrence (deterministic on every
backend; plain `tensor[idx] = v` does not guarantee which one wins).

Bad input. Opening a store file checks that it is a complete Arrow IPC file (a truncated file
fails: its footer is gone) with this module's layout, and that its sample shape, dtype, sample
count, seed, dataset fingerprint, rank and world size match the run; any mismatch raises
`StoreError` naming the file, the field, the expected and the found value. `open_store` with
`resume=False` refuses to overwrite an existing store file, and a checkpoint's store state must
name the same file (by a random id written into the file at creation) as the store it is loaded
into: estimates are never silently re-initialised.

File layout (schema metadata `dddm.x0_store` holds the JSON description; one record batch, or
several of `rows_per_batch` rows when a slot has more than 2^31 - 1 values -- the array length
every Arrow implementation reads -- e.g. ImageNet 64x64's 15.7e9):
    est_0, est_1  arrow.fixed_shape_tensor<value, sample_shape>  the two slots (value: float32,
                  float16, or uint16 holding raw bfloat16 bits -- Arrow has no bfloat16)
    index         int64   the dataset index of each row (this rank's owned indices, ascending)
    latest        uint8   which slot held the newest estimate of each row at the last
                          state_dict / begin_epoch / close; informational, the checkpoint's
                          state is authoritative
`read_store_file(path)` returns the newest estimates with plain pyarrow. The first `est_0`
buffer starts page aligned; `est_1` is left as a hole (sparse) until written, so a new store
takes one slot of disk space, and both after its first epoch.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pyarrow as pa
import torch

from .rng import STREAM_INITIAL_ESTIMATE, normal_per_index

log = logging.getLogger(__name__)

__all__ = [
    "ArrowStore", "DeviceStore", "EstimateStore", "StoreError", "initial_estimates", "open_store",
    "owned_indices", "read_store_file", "store_nbytes", "store_path",
]

FORMAT = "dddm.x0_store"
FORMAT_VERSION = 1
_META_KEY = b"dddm.x0_store"
_PAD_KEY = b"dddm.pad"
_PAGE = 4096
_CHUNK_BYTES = 64 << 20  # rows per chunk when creating / converting: about 64 MB
POLICIES = ("auto", "device", "arrow")


class StoreError(ValueError):
    """A store file or checkpoint state that does not fit the run, or a misuse of the store."""


@dataclass(frozen=True)
class _Dtype:
    name: str
    torch: torch.dtype
    bits: np.dtype  # host representation (bfloat16: int16 bits)
    bits_torch: torch.dtype  # the same in torch
    arrow: pa.DataType  # Arrow value type (bfloat16: uint16 bits)

    @property
    def itemsize(self) -> int:
        return self.bits.itemsize


_DTYPES = {
    "float32": _Dtype("float32", torch.float32, np.dtype(np.float32), torch.float32, pa.float32()),
    "float16": _Dtype("float16", torch.float16, np.dtype(np.float16), torch.float16, pa.float16()),
    "bfloat16": _Dtype("bfloat16", torch.bfloat16, np.dtype(np.int16), torch.int16, pa.uint16()),
}


def _dtype(dtype) -> _Dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise StoreError(f"store dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------- keys and values

def owned_indices(num_samples: int, rank: int, world_size: int) -> torch.Tensor:
    """The dataset indices rank `rank` owns for the whole run: rank, rank + W, rank + 2W, ...
    (ascending, int64). The ranks' sets are disjoint and together cover range(num_samples);
    their sizes differ by at most one."""
    _check_world(num_samples, rank, world_size)
    return torch.arange(rank, num_samples, world_size, dtype=torch.long)


def _num_owned(num_samples: int, rank: int, world_size: int) -> int:
    return max(0, (num_samples - rank + world_size - 1) // world_size)


def _check_world(num_samples: int, rank: int, world_size: int) -> None:
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
    return _num_owned(num_samples, rank, world_size) * math.prod(sample_shape) * _dtype(dtype).itemsize


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def _last_occurrence(local: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, src): unique rows and, per row, the position of its last occurrence in `local`;
    src is None when `local` has no duplicates (rows is then `local` itself)."""
    if len(local) < 2:
        return local, None
    order = np.argsort(local, kind="stable")
    ordered = local[order]
    last = np.empty(len(local), dtype=bool)
    last[-1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
    if last.all():
        return local, None
    return ordered[last], order[last]


def _pack(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.astype(bool)))


def _unpack(packed, n: int, what: str) -> np.ndarray:
    arr = np.asarray(torch.as_tensor(packed).cpu().numpy(), dtype=np.uint8)
    if arr.ndim != 1 or len(arr) != (n + 7) // 8:
        raise StoreError(f"checkpoint store state: '{what}' holds {arr.size * 8} bits, expected {n}")
    return np.unpackbits(arr, count=n).astype(bool)


# ----------------------------------------------------------------------------- host row tables

class _HostTable:
    """A (rows, numel) array in host memory seen in the storage dtype (the device store on CPU)."""

    def __init__(self, array: np.ndarray, dtype: _Dtype):
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


class _FileTable:
    """One slot of the store file: its rows, in one or more record batches of `chunk_rows` rows,
    each a zero-copy view of the Arrow buffer in the memory map. Reads index the map, writes store
    into it. When the file is larger than about half the RAM (`from_disk`), most rows are not in
    the page cache: then a gather first asks the kernel for all its rows at once (madvise
    WILLNEED) instead of faulting them in one page after another, and a scatter writes with one
    pwrite per row, because a store into a mapped page that is not in memory first reads that page
    from disk (a pwrite of whole pages does not). For a file in the page cache, stores into the map
    are the faster path (measured here: also after writeback, when the first store into each page
    takes a write fault)."""

    def __init__(self, arrays: list[np.ndarray], chunk_rows: int, offsets: list[int], dtype: _Dtype,
                 mm: mmap.mmap, fd: int | None, from_disk: bool):
        self.parts = [_HostTable(a, dtype) for a in arrays]
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


def _fill_rows(table_put: Callable[[slice, torch.Tensor], None], n: int, row_bytes: int,
               source: Callable[[int, int], torch.Tensor]) -> None:
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        table_put(slice(start, end), source(start, end))


# ----------------------------------------------------------------------------- the interface

class EstimateStore:
    """One rank's x0 estimates; see the module docstring for the semantics."""

    backend = "base"
    needs_epoch_checkpoint = False

    def __init__(self, *, num_samples: int, sample_shape, dtype, seed: int, fingerprint: str,
                 device, rank: int = 0, world_size: int = 1):
        _check_world(num_samples, rank, world_size)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise StoreError(f"sample_shape must be a non-empty tuple of positive sizes, got {sample_shape!r}")
        self.num_samples = int(num_samples)
        self._dtype = _dtype(dtype)
        self.seed = int(seed)
        self.fingerprint = str(fingerprint)
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.owned = owned_indices(self.num_samples, self.rank, self.world_size)
        self.num_owned = len(self.owned)
        self.row_numel = math.prod(self.sample_shape)
        self.epoch = 0
        self._written = np.zeros(self.num_owned, dtype=bool)
        self._awaiting_state = False  # opened with resume=True: load_state_dict comes first
        self._started = False  # begin_epoch called since creation / load_state_dict
        self._dirty = False  # scattered since the last state_dict
        self._checkpointed = False  # state_dict has been taken (the run checkpoints)

    # -- description
    @property
    def dtype(self) -> str:
        """The storage dtype's name: float32, float16 or bfloat16."""
        return self._dtype.name

    @property
    def nbytes(self) -> int:
        """Bytes of estimate storage (device memory, or file data: two slots per sample)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.backend} store (rank {self.rank} of {self.world_size})"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_owned} of {self.num_samples} samples x "
                f"{'x'.join(map(str, self.sample_shape))} {self.dtype}, epoch {self.epoch}, {self.describe()})")

    def _meta(self) -> dict:
        return {"num_samples": self.num_samples, "sample_shape": list(self.sample_shape), "dtype": self.dtype,
                "seed": self.seed, "fingerprint": self.fingerprint, "rank": self.rank,
                "world_size": self.world_size, "partition": "strided", "num_owned": self.num_owned}

    # -- keys
    def _local(self, indices) -> np.ndarray:
        """Row numbers in this rank's store of the dataset indices (validated, int64 numpy)."""
        if isinstance(indices, torch.Tensor):
            idx = indices.detach().to("cpu", torch.long).numpy()
        else:
            idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise StoreError(f"{self.describe()}: indices must be 1-D, got shape {tuple(idx.shape)}")
        if len(idx) == 0:
            return idx.astype(np.int64)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.num_samples:
            raise StoreError(f"{self.describe()}: index {lo if lo < 0 else hi} is outside the dataset "
                             f"(0..{self.num_samples - 1})")
        if self.world_size == 1:
            return idx.astype(np.int64, copy=False)
        shifted = idx - self.rank
        foreign = shifted % self.world_size != 0
        if foreign.any():
            raise StoreError(f"{self.describe()}: index {int(idx[foreign][0])} is owned by rank "
                             f"{int(idx[foreign][0]) % self.world_size}, not {self.rank}")
        return shifted // self.world_size

    def _check_ready(self) -> None:
        if self._awaiting_state:
            raise StoreError(f"{self.describe()}: opened with resume=True; load_state_dict(<checkpoint's "
                             f"store state>) must come first")

    def _check_started(self) -> None:
        self._check_ready()
        if not self._started:
            raise StoreError(f"{self.describe()}: call begin_epoch(epoch) before gather/scatter")

    # -- the training interface
    def begin_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`: the current one again (a resumed run) or the next one. Samples
        written in the finished epoch become the ones read in the new epoch."""
        self._check_ready()
        epoch = int(epoch)
        if epoch == self.epoch + 1:
            if self.needs_epoch_checkpoint and self._checkpointed and self._dirty:
                log.warning("%s: epoch %d starts without a checkpoint after the last scatter of epoch %d; "
                            "the latest checkpoint can no longer be resumed once epoch %d writes",
                            self.describe(), epoch, self.epoch, epoch)
            written = int(self._written.sum())
            if written < self.num_owned:
                log.info("%s: epoch %d scattered %d of %d owned samples; the others keep their estimates",
                         self.describe(), self.epoch, written, self.num_owned)
            self._advance()
            self._written[:] = False
            self.epoch = epoch
        elif epoch != self.epoch:
            raise StoreError(f"{self.describe()}: begin_epoch({epoch}) in epoch {self.epoch}: epochs advance "
                             f"one at a time (the store holds the estimates of one epoch boundary)")
        self._started = True
        self._update_mirror()

    def gather(self, indices) -> torch.Tensor:
        """Estimates for the dataset indices as float32 (len, *sample_shape) on the training device:
        each sample's estimate as of the start of this epoch. Repeated indices get the same value;
        an index already scattered this epoch raises StoreError. `indices`: 1-D integers (tensor,
        array or list); they are checked on the host, so CPU indices avoid a device sync."""
        self._check_started()
        local = self._local(indices)
        if self._written[local].any():
            again = int(self.owned[int(local[self._written[local]][0])])
            raise StoreError(f"{self.describe()}: sample {again} was already scattered in epoch {self.epoch}; "
                             f"a sample is gathered at most once per epoch, before its scatter")
        return self._read(local).to(self.device, non_blocking=True).float().reshape(len(local), *self.sample_shape)

    def scatter(self, indices, values: torch.Tensor) -> None:
        """Store new estimates (any float dtype and device, shape (len, *sample_shape)), converted to
        the storage dtype. For repeated indices the last occurrence wins."""
        self._check_started()
        local = self._local(indices)
        values = torch.as_tensor(values).detach()
        if tuple(values.shape) != (len(local), *self.sample_shape):
            raise StoreError(f"{self.describe()}: scatter of {len(local)} indices got values of shape "
                             f"{tuple(values.shape)}, expected {(len(local), *self.sample_shape)}")
        if not values.is_floating_point():
            raise StoreError(f"{self.describe()}: scatter values must be floating point, got {values.dtype}")
        if len(local) == 0:
            return
        rows, src = _last_occurrence(local)
        if src is not None:
            values = values[torch.from_numpy(src).to(values.device)]
        self._write(rows, values.reshape(len(rows), self.row_numel).to(self._dtype.torch))
        self._written[rows] = True
        self._dirty = True

    def estimates(self, indices=None) -> torch.Tensor:
        """The newest estimate of each index (all owned indices by default), float32 on the CPU: the
        value written this epoch if any, else the one gather returns. For inspection and tests;
        not subject to the once-per-epoch rule."""
        self._check_ready()
        local = np.arange(self.num_owned, dtype=np.int64) if indices is None else self._local(indices)
        return self._latest(local).cpu().float().reshape(len(local), *self.sample_shape)

    # -- checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the store (see the module docstring)."""
        self._check_ready()
        self.flush()
        self._dirty = False
        self._checkpointed = True
        return {"format": FORMAT, "version": FORMAT_VERSION, "backend": self.backend, "epoch": self.epoch,
                **self._meta(), "written": _pack(self._written), **self._backend_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's `state_dict()`, of either backend."""
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != FORMAT:
            raise StoreError(f"{self.describe()}: the checkpoint's store state is not an x0 store state "
                             f"(format {found!r}, expected {FORMAT!r})")
        if state.get("version") != FORMAT_VERSION:
            raise StoreError(f"{self.describe()}: store state version {state.get('version')} "
                             f"(this code reads version {FORMAT_VERSION})")
        _compare_meta(self._meta(), state, "checkpoint store state")
        written = _unpack(state["written"], self.num_owned, "written")
        if state["backend"] == "arrow":
            slot = _unpack(state["slot"], self.num_owned, "slot")
            self._load_from_arrow(state, slot, written)
        elif state["backend"] == "device":
            est = torch.as_tensor(state["estimates"])
            if tuple(est.shape) != (self.num_owned, *self.sample_shape) or est.dtype != self._dtype.torch:
                raise StoreError(f"{self.describe()}: checkpoint estimates are {est.dtype} "
                                 f"{tuple(est.shape)}, expected {self._dtype.torch} "
                                 f"{(self.num_owned, *self.sample_shape)}")
            self._load_from_device(est.reshape(self.num_owned, self.row_numel), written)
        else:
            raise StoreError(f"{self.describe()}: unknown store backend {state['backend']!r} in the checkpoint")
        self._written[:] = written
        self.epoch = int(state["epoch"])
        self._awaiting_state = False
        self._started = False
        self._dirty = False
        self._checkpointed = True
        self.flush()

    def flush(self) -> None:
        """Make the stored estimates durable (Arrow: fdatasync); a no-op on the device."""

    def _update_mirror(self) -> None:
        """Arrow: record in the file which slot holds each row's newest estimate (informational)."""

    def close(self) -> None:
        """Flush and release the storage; the store is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- backend hooks
    def _read(self, local: np.ndarray) -> torch.Tensor:  # (k, numel), storage dtype
        raise NotImplementedError

    def _latest(self, local: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _write(self, rows: np.ndarray, values: torch.Tensor) -> None:  # unique rows
        raise NotImplementedError

    def _advance(self) -> None:
        """Epoch boundary: the samples written in the finished epoch become the ones read."""

    def _backend_state(self) -> dict:
        raise NotImplementedError

    def _load_from_device(self, est: torch.Tensor, written: np.ndarray) -> None:
        raise NotImplementedError

    def _load_from_arrow(self, state: dict, slot: np.ndarray, written: np.ndarray) -> None:
        raise NotImplementedError

    def _initial_source(self) -> Callable[[int, int], torch.Tensor]:
        owned = self.owned

        def source(start: int, end: int) -> torch.Tensor:
            est = initial_estimates(owned[start:end], self.sample_shape, self.seed)
            return est.reshape(end - start, self.row_numel).to(self._dtype.torch)
        return source


def _compare_meta(expected: dict, found: dict, where: str) -> None:
    bad = []
    for key, want in expected.items():
        got = found.get(key, "<missing>")
        if isinstance(want, list) and isinstance(got, (list, tuple)):
            got = list(got)
        if got != want:
            bad.append(f"{key}: the run expects {want!r}, found {got!r}")
    if bad:
        raise StoreError(f"{where} does not match the run: " + "; ".join(bad))


# ----------------------------------------------------------------------------- device backend

class DeviceStore(EstimateStore):
    """Estimates in one tensor on the training device, updated in place."""

    backend = "device"
    needs_epoch_checkpoint = False

    def __init__(self, *, num_samples, sample_shape, dtype, seed, fingerprint, device, rank=0, world_size=1,
                 resume: bool = False):
        super().__init__(num_samples=num_samples, sample_shape=sample_shape, dtype=dtype, seed=seed,
                         fingerprint=fingerprint, device=device, rank=rank, world_size=world_size)
        shape = (self.num_owned, self.row_numel)
        if self.device.type == "cpu":
            self._host = _HostTable(np.empty(shape, dtype=self._dtype.bits), self._dtype)
            self._buf = self._host.tensor.view(self._dtype.torch)
        else:
            self._host = None
            self._buf = torch.empty(shape, dtype=self._dtype.torch, device=self.device)
        if resume:
            self._awaiting_state = True
        else:
            self._fill(self._initial_source())

    @property
    def nbytes(self) -> int:
        return self._buf.numel() * self._buf.element_size()

    def _fill(self, source) -> None:
        def put(rows: slice, values: torch.Tensor) -> None:
            self._buf[rows] = values.to(self.device)
        _fill_rows(put, self.num_owned, self.row_numel * self._dtype.itemsize, source)

    def _read(self, local):
        if self._host is not None:
            return self._host.take(local)
        return self._buf.index_select(0, torch.from_numpy(local).to(self.device, non_blocking=True))

    _latest = _read

    def _write(self, rows, values):
        if self._host is not None:
            self._host.put(rows, values.cpu())
        else:
            self._buf.index_copy_(0, torch.from_numpy(rows).to(self.device, non_blocking=True),
                                  values.to(self.device))

    def _backend_state(self) -> dict:
        est = self._buf.detach().to("cpu", copy=True)
        return {"estimates": est.reshape(self.num_owned, *self.sample_shape)}

    def _load_from_device(self, est, written):
        self._buf.copy_(est.to(self.device))

    def _load_from_arrow(self, state, slot, written):
        path = Path(state["path"])
        if not path.exists():
            raise StoreError(f"{path}: the Arrow store file the checkpoint refers to is missing")
        with _StoreFile(path, self._meta(), self._dtype, writable=False) as f:
            if f.file_id != state["file_id"]:
                raise StoreError(f"{path}: file id {f.file_id} is not the store file the checkpoint refers to "
                                 f"(id {state['file_id']})")
            newest = (slot ^ written).astype(np.uint8)

            def source(start, end):
                return _read_slots(f.tables, np.arange(start, end), newest[start:end])
            self._fill(source)
        log.info("%s: loaded the estimates of the checkpoint's Arrow store %s", self.describe(), path)


# ----------------------------------------------------------------------------- Arrow backend

def _read_slots(tables: list[_FileTable], rows: np.ndarray, slots: np.ndarray) -> torch.Tensor:
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


class ArrowStore(EstimateStore):
    """Estimates in a memory-mapped Arrow IPC file, two slots per sample (see the module docstring)."""

    backend = "arrow"
    needs_epoch_checkpoint = True

    def __init__(self, *, path, num_samples, sample_shape, dtype, seed, fingerprint, device, rank=0,
                 world_size=1, resume: bool = False):
        super().__init__(num_samples=num_samples, sample_shape=sample_shape, dtype=dtype, seed=seed,
                         fingerprint=fingerprint, device=device, rank=rank, world_size=world_size)
        self.path = Path(path)
        self._slot = np.zeros(self.num_owned, dtype=np.uint8)
        self._file: _StoreFile | None = None
        if resume:
            self._awaiting_state = True
            if self.path.exists():
                self._file = _StoreFile(self.path, self._meta(), self._dtype, writable=True)
            # else: created by load_state_dict from a device checkpoint (an Arrow one names a file)
        else:
            if self.path.exists():
                raise StoreError(f"{self.path}: a store file already exists; resume from the checkpoint that "
                                 f"refers to it (resume=True) or delete it to start with fresh estimates")
            self._create(self._initial_source())

    def _create(self, source) -> None:
        _create_store_file(self.path, self._meta(), self._dtype, self.sample_shape,
                           self.owned.numpy(), source)
        self._file = _StoreFile(self.path, self._meta(), self._dtype, writable=True)

    @property
    def file_id(self) -> str | None:
        return None if self._file is None else self._file.file_id

    @property
    def nbytes(self) -> int:
        return 2 * self.num_owned * self.row_numel * self._dtype.itemsize

    def describe(self) -> str:
        return str(self.path)

    def _tables(self) -> list[_FileTable]:
        if self._file is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self._file.tables

    def _read(self, local):
        return _read_slots(self._tables(), local, self._slot[local])

    def _latest(self, local):
        return _read_slots(self._tables(), local, self._slot[local] ^ self._written[local])

    def _write(self, rows, values):
        tables = self._tables()
        target = 1 - self._slot[rows]
        values = values.cpu()
        first = int(target[0])
        if (target == first).all():
            tables[first].put(rows, values)
        else:
            for s in (0, 1):
                pick = np.flatnonzero(target == s)
                tables[s].put(rows[pick], values[torch.from_numpy(pick)])

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
        return {"path": str(self.path.resolve()), "file_id": self.file_id, "slot": _pack(self._slot)}

    def _load_from_arrow(self, state, slot, written):
        if self._file is None:
            raise StoreError(f"{self.path}: missing, but the checkpoint's estimates are in this Arrow file "
                             f"({state['path']}, id {state['file_id']})")
        if state["file_id"] != self._file.file_id:
            raise StoreError(f"{self.path}: file id {self._file.file_id} is not the store file the checkpoint "
                             f"refers to ({state['path']}, id {state['file_id']}); the estimates that "
                             f"checkpoint needs are gone -- start a new run")
        self._slot[:] = slot

    def _load_from_device(self, est, written):
        source = lambda start, end: est[start:end]  # noqa: E731
        if self._file is None:
            self._create(source)
        else:
            def put(rows: slice, values):
                self._file.tables[0].put(np.arange(rows.start, rows.stop), values)
            _fill_rows(put, self.num_owned, self.row_numel * self._dtype.itemsize, source)
        # Every newest estimate is now in slot 0. Samples not yet written in the checkpoint's epoch read
        # it as their epoch-start estimate (slot bit 0); for written ones the bit is 1, so slot 0 is
        # their "written this epoch" slot -- their epoch-start value is not needed (never gathered again).
        self._slot[:] = written.astype(np.uint8)
        log.info("%s: filled from the checkpoint's device-store estimates", self.path)


# ----------------------------------------------------------------------------- the Arrow file

# Arrays of at most 2^31 - 1 elements, as pyarrow writes by default and every Arrow implementation
# reads: a store with more values per slot is split into several record batches of equal rows.
_MAX_ARRAY_ELEMENTS = 2**31 - 1


def _schema(meta: dict, dtype: _Dtype, shape: tuple[int, ...], pad: int) -> pa.Schema:
    tensor = pa.fixed_shape_tensor(dtype.arrow, list(shape))
    return pa.schema([pa.field("est_0", tensor, nullable=False), pa.field("est_1", tensor, nullable=False),
                      pa.field("index", pa.int64(), nullable=False), pa.field("latest", pa.uint8(), nullable=False)],
                     metadata={_META_KEY: json.dumps(meta, sort_keys=True), _PAD_KEY: " " * pad})


class _Sink:
    """A file-like sink for pyarrow's IPC writer that writes the estimate buffers itself: est_0
    from the initial values (streamed, never held in memory), est_1 as a hole (sparse). It knows
    them by address: they are slices of a placeholder mapping that nothing ever reads."""

    def __init__(self, f, targets: dict[int, tuple[int, int, int]], fill: Callable):
        self.f, self.targets, self.fill = f, targets, fill
        self.first_offset: int | None = None
        self.closed = False

    def write(self, data) -> None:
        target = self.targets.get(data.address) if isinstance(data, pa.Buffer) else None
        if target is None:
            self.f.write(data)
            return
        slot, start, end = target
        if self.first_offset is None:
            self.first_offset = self.f.tell()
        if slot == 0:
            self.fill(self.f, start, end)
        else:
            self.f.seek(data.size, os.SEEK_CUR)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True


class _NullFile:
    """Counts bytes: for a dry run of the writer."""

    def __init__(self):
        self.pos = 0

    def write(self, data) -> None:
        self.pos += data.size if isinstance(data, pa.Buffer) else len(memoryview(data).cast("B"))

    def seek(self, k: int, whence: int) -> None:
        self.pos += k

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


def _create_store_file(path: Path, meta: dict, dtype: _Dtype, shape: tuple[int, ...], owned: np.ndarray,
                       source: Callable[[int, int], torch.Tensor]) -> None:
    """Write the store file (as <path>.tmp, renamed when complete), est_0 from `source`."""
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    n, numel = len(owned), math.prod(shape)
    row_bytes = numel * dtype.itemsize
    size = n * row_bytes
    chunk_rows = max(1, min(n, _MAX_ARRAY_ELEMENTS // numel))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "file_id": uuid.uuid4().hex, "rows_per_batch": chunk_rows,
            "init": "dddm.rng.normal_per_index(index, shape, seed, STREAM_INITIAL_ESTIMATE)",
            "value_encoding": "bfloat16 bits in uint16" if dtype.name == "bfloat16" else dtype.name, **meta}
    tmp = path.with_name(path.name + ".tmp")
    holder = tmp.with_name(path.name + ".placeholder")
    # Stand-ins for the estimate buffers: a read-only map of a sparse file, slot 0 at 0, slot 1 after it.
    second = size + _PAGE
    with open(holder, "wb") as h:
        h.truncate(second + size + _PAGE)
    with open(holder, "rb") as h:
        placeholder = mmap.mmap(h.fileno(), second + size + _PAGE, access=mmap.ACCESS_READ)
    holder.unlink()
    base = batches = None
    try:
        base = pa.py_buffer(placeholder)
        tensor_type = pa.fixed_shape_tensor(dtype.arrow, list(shape))
        targets: dict[int, tuple[int, int, int]] = {}
        batches = []
        for start in range(0, n, chunk_rows):
            end = min(n, start + chunk_rows)
            columns = []
            for slot, origin in enumerate((0, second)):
                buf = base.slice(origin + start * row_bytes, (end - start) * row_bytes)
                targets[buf.address] = (slot, start, end)
                columns.append(pa.ExtensionArray.from_storage(tensor_type, pa.FixedSizeListArray.from_arrays(
                    pa.Array.from_buffers(dtype.arrow, (end - start) * numel, [None, buf]), numel)))
            columns += [pa.array(owned[start:end], pa.int64()), pa.array(np.zeros(end - start, np.uint8))]
            batches.append(columns)

        def write(f, fill, pad: int) -> int:
            sink = _Sink(f, targets, fill)
            schema = _schema(meta, dtype, shape, pad)
            with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), schema) as writer:
                for columns in batches:
                    writer.write_batch(pa.record_batch(columns, schema=schema))
            return sink.first_offset

        # A dry run finds where est_0 starts; padding the schema metadata then page-aligns it.
        offset = write(_NullFile(), lambda f, start, end: f.seek((end - start) * row_bytes, os.SEEK_CUR), 0)
        size0 = _schema(meta, dtype, shape, 0).serialize().size
        pad = next((p for p in range(0, 2 * _PAGE, 8)
                    if (offset + _schema(meta, dtype, shape, p).serialize().size - size0) % _PAGE == 0), 0)

        with tqdm(total=size, unit="B", unit_scale=True, desc=f"create {path.name}",
                  disable=size < (512 << 20)) as bar:
            def fill(f, start: int, end: int) -> None:
                step = max(1, _CHUNK_BYTES // row_bytes)
                for lo in range(start, end, step):
                    hi = min(end, lo + step)
                    block = source(lo, hi).contiguous().view(dtype.bits_torch).numpy()
                    f.write(memoryview(block).cast("B"))
                    bar.update(block.nbytes)

            with open(tmp, "wb") as f:
                write(f, fill, pad)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        del base, batches
        targets = None
        try:
            placeholder.close()
        except BufferError:  # pragma: no cover - still referenced; unmapped when collected
            pass
    log.info("created x0 store file %s (%s of estimates in two slots, %d record batch(es))", path,
             _fmt_bytes(2 * size), -(-n // chunk_rows))


class _StoreFile:
    """An opened, validated store file: numpy views of its Arrow buffers over one memory map."""

    def __init__(self, path: Path, expected: dict, dtype: _Dtype, writable: bool):
        self.path, self.writable = Path(path), writable
        n, numel = expected["num_owned"], math.prod(expected["sample_shape"])
        shape = tuple(expected["sample_shape"])
        offsets = self._validate(expected, dtype, shape, n, numel)  # sets meta, file_id, chunk_rows
        self._fh = open(self.path, "r+b" if writable else "rb")
        try:
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        except Exception:
            self._fh.close()
            raise
        raw = np.frombuffer(self._mm, dtype=np.uint8)  # read-only for an ACCESS_READ map
        rows = [min(self.chunk_rows, n - start) for start in range(0, n, self.chunk_rows)]

        def views(name: str, np_dtype: np.dtype, width: int | None) -> list[np.ndarray]:
            out = []
            for k, count in enumerate(rows):
                nbytes = count * (width or 1) * np_dtype.itemsize
                arr = raw[offsets[k][name]:offsets[k][name] + nbytes].view(np_dtype)
                out.append(arr.reshape(count, width) if width else arr)
            return out
        # larger than about half the RAM available now: the rows mostly come from disk
        self.from_disk = 2 * n * numel * dtype.itemsize > 0.5 * psutil.virtual_memory().available
        fd = self._fh.fileno() if writable else None
        self.tables = [_FileTable(views(name, dtype.bits, numel), self.chunk_rows,
                                  [o[name] for o in offsets], dtype, self._mm, fd, self.from_disk)
                       for name in ("est_0", "est_1")]
        self.latest = views("latest", np.dtype(np.uint8), None)
        index = np.concatenate(views("index", np.dtype(np.int64), None))
        want = np.arange(expected["rank"], expected["num_samples"], expected["world_size"], dtype=np.int64)
        if not np.array_equal(index, want):
            self.close()
            raise StoreError(f"{self.path}: the index column does not hold the {n} indices rank "
                             f"{expected['rank']} of {expected['world_size']} owns")

    def set_latest(self, values: np.ndarray) -> None:
        for k, part in enumerate(self.latest):
            part[:] = values[k * self.chunk_rows:k * self.chunk_rows + len(part)]

    def _validate(self, expected: dict, dtype: _Dtype, shape, n: int, numel: int) -> list[dict[str, int]]:
        path = self.path
        try:
            source = pa.memory_map(str(path), "r")
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: cannot open the store file ({e})") from e
        try:
            try:
                reader = pa.ipc.open_file(source)
            except (pa.ArrowException, OSError) as e:
                raise StoreError(f"{path}: not a valid Arrow IPC file, truncated or corrupt ({e})") from e
            md = reader.schema.metadata or {}
            if _META_KEY not in md:
                raise StoreError(f"{path}: an Arrow file but not an x0 store (no {_META_KEY.decode()} "
                                 f"in its schema metadata)")
            try:
                meta = json.loads(md[_META_KEY])
            except ValueError as e:
                raise StoreError(f"{path}: unreadable {_META_KEY.decode()} metadata ({e})") from e
            if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                raise StoreError(f"{path}: store format {meta.get('format')!r} version {meta.get('version')!r}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
            _compare_meta(expected, meta, str(path))
            self.file_id, self.meta = meta["file_id"], meta
            self.chunk_rows = int(meta.get("rows_per_batch", 0))
            if self.chunk_rows < 1:
                raise StoreError(f"{path}: rows_per_batch is {meta.get('rows_per_batch')!r}")
            tensor = pa.fixed_shape_tensor(dtype.arrow, list(shape))
            want = {"est_0": tensor, "est_1": tensor, "index": pa.int64(), "latest": pa.uint8()}
            for name, typ in want.items():
                idx = reader.schema.get_field_index(name)
                if idx < 0 or not reader.schema.field(idx).type.equals(typ):
                    found = reader.schema.field(idx).type if idx >= 0 else "<missing>"
                    raise StoreError(f"{path}: column {name!r} is {found}, expected {typ}")
            num_batches = -(-n // self.chunk_rows)
            if reader.num_record_batches != num_batches:
                raise StoreError(f"{path}: {reader.num_record_batches} record batches, expected {num_batches} "
                                 f"of {self.chunk_rows} rows")
            source.seek(0)
            base = source.read_buffer(1).address
            file_size = os.path.getsize(path)
            itemsize = dtype.itemsize
            align = {"est_0": itemsize, "est_1": itemsize, "index": 8, "latest": 1}
            offsets = []
            for k in range(num_batches):
                rows = min(self.chunk_rows, n - k * self.chunk_rows)
                try:
                    batch = reader.get_batch(k)
                except (pa.ArrowException, OSError) as e:
                    raise StoreError(f"{path}: record batch {k} cannot be read, truncated or corrupt ({e})") from e
                if batch.num_rows != rows:
                    raise StoreError(f"{path}: record batch {k} has {batch.num_rows} rows, expected {rows}")
                sizes = {"est_0": rows * numel * itemsize, "est_1": rows * numel * itemsize,
                         "index": 8 * rows, "latest": rows}
                where = {}
                for name, nbytes in sizes.items():
                    col = batch.column(name)
                    arr = col.storage.values if name.startswith("est") else col
                    if arr.offset != 0 or (name.startswith("est") and col.storage.offset != 0):
                        raise StoreError(f"{path}: column {name!r} is a slice; expected a plain buffer")
                    buf = arr.buffers()[1]
                    if buf is None or buf.size < nbytes:
                        raise StoreError(f"{path}: column {name!r} of record batch {k} holds "
                                         f"{0 if buf is None else buf.size} bytes, expected {nbytes}")
                    off = buf.address - base
                    if off < 0 or off + nbytes > file_size or off % align[name]:
                        raise StoreError(f"{path}: column {name!r} of record batch {k} at byte {off} is "
                                         f"outside the file or misaligned")
                    where[name] = off
                offsets.append(where)
                del batch
            del reader
            return offsets
        finally:
            source.close()

    def flush(self) -> None:
        """Write everything to disk: stores into the map and pwrites both sit in the page cache."""
        if self.writable:
            os.fdatasync(self._fh.fileno())

    def close(self) -> None:
        if self._mm is None:
            return
        self.flush()
        self.tables = self.latest = None
        try:
            self._mm.close()
        except BufferError:  # a view still exported (e.g. a caller's tensor): unmapped when collected
            pass
        self._fh.close()
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_store_file(path) -> dict:
    """The newest estimates in a store file as of its last flush, read with plain pyarrow (all in
    memory): {"meta": the file's metadata, "index": int64 (n,), "estimates": float32 (n, *shape)}.
    The same for any Arrow reader: per row, est_0 where latest == 0 and est_1 where latest == 1;
    for bfloat16 the values are uint16 bits (shift left by 16 and read as float32)."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    meta = json.loads(table.schema.metadata[_META_KEY])
    shape = tuple(meta["sample_shape"])
    slots = [np.concatenate([chunk.storage.flatten().to_numpy(zero_copy_only=False)
                             for chunk in table.column(name).chunks]).reshape(len(table), *shape)
             for name in ("est_0", "est_1")]
    latest = table.column("latest").to_numpy().astype(bool).reshape(-1, *([1] * len(shape)))
    est = np.where(latest, slots[1], slots[0])
    if meta["dtype"] == "bfloat16":
        est = (est.astype(np.uint32) << 16).view(np.float32)
    return {"meta": meta, "index": table.column("index").to_numpy(), "estimates": est.astype(np.float32)}


# ----------------------------------------------------------------------------- the factory

def _budget(device: torch.device, fraction: float) -> tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(fraction * free), f"{fraction:g} x free GPU memory {_fmt_bytes(free)}"
    available = psutil.virtual_memory().available
    return int(fraction * available), f"{fraction:g} x available RAM {_fmt_bytes(available)}"


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
    _check_world(num_samples, rank, world_size)
    path = store_path(directory, rank)
    need = store_nbytes(num_samples, sample_shape, dtype, rank, world_size)
    shape_txt = "x".join(str(int(s)) for s in sample_shape)
    sizes = (f"{_num_owned(num_samples, rank, world_size)} of {num_samples} samples x {shape_txt} "
             f"{_dtype(dtype).name} = {_fmt_bytes(need)}")
    backend, why = policy, f"policy {policy}"
    if policy == "auto":
        budget, budget_txt = _budget(device, budget_fraction)
        if path.exists():
            if not resume:
                raise StoreError(f"{path}: a store file already exists; resume from the checkpoint that refers "
                                 f"to it (resume=True) or delete it to start with fresh estimates")
            backend, why = "arrow", f"auto, resuming the existing file; budget {_fmt_bytes(budget)} = {budget_txt}"
        else:
            backend = "device" if need <= budget else "arrow"
            why = f"auto, budget {_fmt_bytes(budget)} = {budget_txt}"
    where = f"{device}" if backend == "device" else f"{path} ({_fmt_bytes(2 * need)} in the file: two slots)"
    log.info("x0 store, rank %d of %d: %s -> %s on %s (%s)", rank, world_size, sizes, backend, where, why)
    common = dict(num_samples=num_samples, sample_shape=sample_shape, dtype=dtype, seed=seed,
                  fingerprint=fingerprint, device=device, rank=rank, world_size=world_size, resume=resume)
    if backend == "device":
        return DeviceStore(**common)
    return ArrowStore(path=path, **common)
