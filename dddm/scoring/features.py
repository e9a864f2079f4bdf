"""Sample images checked, converted and run through a feature network batch by batch, keeping
only the features (docs/scoring.md, "Images")."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..pixels import to_float, to_uint8
from ..progress import progress as progress_bar

_FLOAT_TOL = 1e-3  # float images may exceed [-1, 1] by this much (rounding); beyond it is an error


def validate_images(images: Any, *, name: str = "samples",
                    expected_shape: Sequence[int] | None = None, batch_size: int = 4096) -> None:
    """Raise ValueError (naming `name`) unless `images` is (N, C, H, W), N >= 2, C in (1, 3),
    H = W >= 8 (and (C, H, W) == expected_shape if given), uint8, or float finite in [-1, 1]."""
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name}: expected a numpy array or tensor, got {type(images).__name__}")
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: expected (N, C, H, W) images, got shape {shape}")
    n, c, h, w = shape
    if c not in (1, 3) or h != w or h < 8:
        raise ValueError(f"{name}: expected (N, C, H, H) with C in (1, 3) and H >= 8, got shape {shape}")
    if expected_shape is not None and (c, h, w) != tuple(expected_shape):
        raise ValueError(f"{name}: images are {(c, h, w)} but the reference is {tuple(expected_shape)}")
    if n < 2:
        raise ValueError(f"{name}: at least 2 images are needed, got {n}")
    dtype = images.dtype
    is_uint8 = dtype in (np.uint8, torch.uint8)
    is_float = (torch.is_floating_point(images) if isinstance(images, torch.Tensor)
                else np.issubdtype(dtype, np.floating))
    if is_uint8:
        return
    if not is_float:
        raise ValueError(f"{name}: expected uint8 in [0, 255] or float in [-1, 1], got dtype {dtype}")
    lo, hi = math.inf, -math.inf
    for i in range(0, n, batch_size):
        chunk = torch.as_tensor(np.asarray(images[i:i + batch_size]) if isinstance(images, np.ndarray)
                                else images[i:i + batch_size])
        if not torch.isfinite(chunk).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
        lo, hi = min(lo, chunk.min().item()), max(hi, chunk.max().item())
    if lo < -1 - _FLOAT_TOL or hi > 1 + _FLOAT_TOL:
        hint = " (looks like [0, 255]: pass uint8)" if hi > 2 else (" (looks like [0, 1])" if lo >= 0 else "")
        raise ValueError(f"{name}: float images must be in [-1, 1], got [{lo:.4g}, {hi:.4g}]{hint}")


def extract_features(images: np.ndarray | torch.Tensor,
                     features: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], *,
                     input_kind: str = "float", rgb: bool = False, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = True,
                     desc: str = "features") -> np.ndarray | tuple[np.ndarray, ...]:
    """Run `features` over `images` batch by batch; returns (N, D) float32 (a tuple if `features`
    returns a tuple). Each batch is converted to `input_kind` ("uint8": [0, 255], "float":
    [-1, 1]), repeated to 3 channels if `rgb`, moved to `device`; only the features are kept."""
    if input_kind not in ("uint8", "float"):
        raise ValueError(f"input_kind: expected 'uint8' or 'float', got {input_kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(images)
    convert = to_uint8 if input_kind == "uint8" else to_float
    outs: list[np.ndarray] | None = None
    single = False
    with torch.inference_mode(), progress_bar(n, desc, unit="img", disable=not progress) as bar:
        for i in range(0, n, batch_size):
            chunk = images[i:i + batch_size]
            # a copy of the batch: `images` may be a read-only memory map (PreparedDataset.stored_images)
            batch = convert(torch.as_tensor(np.array(chunk) if isinstance(chunk, np.ndarray) else chunk))
            if rgb and batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            out = features(batch.to(device))
            if isinstance(out, torch.Tensor):
                single, out = True, (out,)
            if outs is None:
                outs = [np.empty((n, *o.shape[1:]), np.float32) for o in out]
            for dst, o in zip(outs, out):
                dst[i:i + len(o)] = o.detach().to("cpu", torch.float32).reshape(len(o), *dst.shape[1:]).numpy()
            bar.update(len(batch))
    assert outs is not None
    return outs[0] if single else tuple(outs)


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
