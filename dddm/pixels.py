"""Images as stored (uint8 in [0, 255]) and as the networks see them (float in [-1, 1]): the one
conversion pair every stage uses. uint8 -> float -> uint8 is exact."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> round((x + 1) * 127.5) clamped to [0, 255], uint8; uint8 passes through."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x
    if not torch.is_floating_point(x):
        raise ValueError(f"images: expected uint8 or float, got {x.dtype}")
    return ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 -> u / 127.5 - 1, float32 in [-1, 1]; float passes through as float32."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1.0
    if not torch.is_floating_point(x):
        raise ValueError(f"images: expected uint8 or float, got {x.dtype}")
    return x.to(torch.float32)
