"""The per-sample x0 estimate store: one estimate per training sample, on the training device or
in an Arrow file, read and written by dataset index. The design (ownership, the epoch rule,
crash consistency, corruption checks, the file layout) is in docs/store.md."""

from .arrow import ArrowStore
from .arrow_file import read_store_file, remove_unused
from .base import EstimateStore
from .common import StoreError
from .device import DeviceStore
from .ownership import initial_estimates, owned_indices, store_nbytes, store_path
from .policy import open_store

__all__ = [
    "ArrowStore", "DeviceStore", "EstimateStore", "StoreError", "initial_estimates", "open_store",
    "owned_indices", "read_store_file", "remove_unused", "store_nbytes", "store_path",
]
