"""The contract every x0 store backend keeps: keys, the once-per-epoch gather/scatter rule,
and the checkpoint state (docs/store.md, "Epochs")."""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch

from .checksums import LOST
from .common import FORMAT, STATE_VERSION, StoreError, compare_meta, storage_dtype
from .ownership import check_world, initial_estimates, owned_indices

log = logging.getLogger(__name__)


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


def pack_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.astype(bool)))


def unpack_bits(packed, n: int, what: str) -> np.ndarray:
    arr = np.asarray(torch.as_tensor(packed).cpu().numpy(), dtype=np.uint8)
    if arr.ndim != 1 or len(arr) != (n + 7) // 8:
        raise StoreError(f"checkpoint store state: '{what}' holds {arr.size * 8} bits, expected {n}")
    return np.unpackbits(arr, count=n).astype(bool)


class EstimateStore:
    """One rank's x0 estimates; docs/store.md has the semantics."""

    backend = "base"
    needs_epoch_checkpoint = False

    def __init__(self, *, num_samples: int, sample_shape, dtype, seed: int, fingerprint: str,
                 device, rank: int = 0, world_size: int = 1):
        check_world(num_samples, rank, world_size)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise StoreError(f"sample_shape must be a non-empty tuple of positive sizes, got {sample_shape!r}")
        self.num_samples = int(num_samples)
        self._dtype = storage_dtype(dtype)
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
        values = self._read(local)
        self._check_finite(values, local, "is not finite (NaN or infinite)")
        return values.to(self.device, non_blocking=True).float().reshape(len(local), *self.sample_shape)

    def _check_finite(self, values: torch.Tensor, local: np.ndarray, what: str) -> None:
        """Raise StoreError unless every estimate is finite: the training loop stops on a non-finite
        loss by the end of its epoch, before it gathers or checkpoints an estimate scattered after it,
        so one read back means damaged storage or checkpoint."""
        if values.device.type == "cpu":
            bad_rows = self._dtype.nonfinite_rows(values)
        else:  # on the GPU (the device backend): one small reduction
            bad_rows = (~torch.isfinite(values).all(dim=1)).cpu().numpy()
        if bad_rows.any():
            bad = int(local[np.flatnonzero(bad_rows)[0]])
            raise StoreError(f"{self.describe()}: the estimate of sample {int(self.owned[bad])} {what}. {LOST}")

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
        """What a checkpoint needs to resume the store (docs/store.md)."""
        self._check_ready()
        self.flush()
        self._dirty = False
        self._checkpointed = True
        return {"format": FORMAT, "version": STATE_VERSION, "backend": self.backend, "epoch": self.epoch,
                **self._meta(), "written": pack_bits(self._written), **self._backend_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's `state_dict()`, of either backend."""
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != FORMAT:
            raise StoreError(f"{self.describe()}: the checkpoint's store state is not an x0 store state "
                             f"(format {found!r}, expected {FORMAT!r})")
        if state.get("version") != STATE_VERSION:
            raise StoreError(f"{self.describe()}: store state version {state.get('version')} "
                             f"(this code reads version {STATE_VERSION}); start the run afresh with "
                             f"train.resume=never")
        compare_meta(self._meta(), state, "checkpoint store state")
        written = unpack_bits(state["written"], self.num_owned, "written")
        if state["backend"] == "arrow":
            slot = unpack_bits(state["slot"], self.num_owned, "slot")
            self._load_from_arrow(state, slot, written)
        elif state["backend"] == "device":
            est = torch.as_tensor(state["estimates"])
            if tuple(est.shape) != (self.num_owned, *self.sample_shape) or est.dtype != self._dtype.torch:
                raise StoreError(f"{self.describe()}: checkpoint estimates are {est.dtype} "
                                 f"{tuple(est.shape)}, expected {self._dtype.torch} "
                                 f"{(self.num_owned, *self.sample_shape)}")
            est = est.reshape(self.num_owned, self.row_numel)
            self._check_finite(est, np.arange(self.num_owned), "in the checkpoint is not finite (NaN or infinite)")
            self._load_from_device(est, written)
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
