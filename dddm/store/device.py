"""The device backend: one rank's estimates in one tensor on the training device, updated in
place; its checkpoint state carries a CPU copy (docs/store.md, "Crash consistency (device)")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .arrow_file import StoreFile
from .base import EstimateStore
from .checksums import read_verified, state_checksums
from .common import StoreError
from .tables import HostTable, fill_rows

log = logging.getLogger(__name__)


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
            self._host = HostTable(np.empty(shape, dtype=self._dtype.bits), self._dtype)
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
        fill_rows(put, self.num_owned, self.row_numel * self._dtype.itemsize, source)

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
        with StoreFile(path, self._meta(), self._dtype, writable=False) as f:
            if f.file_id != state["file_id"]:
                raise StoreError(f"{path}: file id {f.file_id} is not the store file the checkpoint refers to "
                                 f"(id {state['file_id']})")
            newest = (slot ^ written).astype(np.uint8)
            sums = state_checksums(state, self.num_owned, str(path))

            def source(start, end):
                return read_verified(path, f.tables, np.arange(start, end), newest[start:end], sums, self.owned)
            self._fill(source)
        log.info("%s: loaded the estimates of the checkpoint's Arrow store %s", self.describe(), path)
