"""Images as stored (uint8 in [0, 255]) and as the networks see them (float in [-1, 1]): the one
conversion pair every stage uses. uint8 -> float -> uint8 is exact."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_open


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


def image_grid(images: torch.Tensor, max_images: int = 64, min_tile: int = 32) -> np.ndarray:
    """Up to 64 images in [-1, 1] as an 8-wide uint8 HWC grid; small images are enlarged
    (nearest neighbour) so a 16x16 digit is still readable."""
    from torchvision.utils import make_grid  # here, not at the top: torchvision adds ~160 MB to every stage's start

    images = to_uint8(images[:max_images].cpu())
    scale = max(1, math.ceil(min_tile / images.shape[-1]))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # nearest neighbour
    return make_grid(images, nrow=8, padding=2, pad_value=255).permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, png_path: Path) -> None:
    """The grid of `images` as a PNG file, written atomically."""
    with atomic_open(png_path) as f:
        Image.fromarray(image_grid(images)).save(f, format="PNG")
