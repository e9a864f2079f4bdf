"""What every part of the x0 store shares: its error, the storage dtypes, the format name, and
the check that a file's or a checkpoint's description fits the run (docs/store.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

FORMAT = "dddm.x0_store"
FORMAT_VERSION = 1  # the Arrow file's layout
STATE_VERSION = 2  # a checkpoint's store state (2: the Arrow state carries row checksums)


class StoreError(ValueError):
    """A store file or checkpoint state that does not fit the run, or a misuse of the store."""


@dataclass(frozen=True)
class StorageDtype:
    name: str
    torch: torch.dtype
    bits: np.dtype  # host representation (bfloat16: int16 bits)
    bits_torch: torch.dtype  # the same in torch
    arrow: pa.DataType  # Arrow value type (bfloat16: uint16 bits)
    word: torch.dtype  # an integer type of the same size
    exponent: int  # the exponent bits, all set in NaN and infinity only

    @property
    def itemsize(self) -> int:
        return self.bits.itemsize

    def nonfinite_rows(self, values: torch.Tensor) -> np.ndarray:
        """Which rows of (k, numel) CPU values in this dtype hold a NaN or an infinity (an integer
        test of the exponent bits: several times faster than torch.isfinite on the CPU)."""
        words = values.contiguous().view(self.word).numpy()
        return ((words & self.exponent) == self.exponent).any(axis=1)


DTYPES = {
    "float32": StorageDtype("float32", torch.float32, np.dtype(np.float32), torch.float32, pa.float32(),
                            torch.int32, 0x7F800000),
    "float16": StorageDtype("float16", torch.float16, np.dtype(np.float16), torch.float16, pa.float16(),
                            torch.int16, 0x7C00),
    "bfloat16": StorageDtype("bfloat16", torch.bfloat16, np.dtype(np.int16), torch.int16, pa.uint16(),
                             torch.int16, 0x7F80),
}


def storage_dtype(dtype) -> StorageDtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise StoreError(f"store dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def compare_meta(expected: dict, found: dict, where: str) -> None:
    bad = []
    for key, want in expected.items():
        got = found.get(key, "<missing>")
        if isinstance(want, list) and isinstance(got, (list, tuple)):
            got = list(got)
        if got != want:
            bad.append(f"{key}: the run expects {want!r}, found {got!r}")
    if bad:
        raise StoreError(f"{where} does not match the run: " + "; ".join(bad))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"
