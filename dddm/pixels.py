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


def image_grid(images: torch.Tensor, max_images: int = 64, min_tile: int = 32, columns: int = 8,
               padding: int = 2) -> np.ndarray:
    """Up to 64 images in [-1, 1] as a `columns`-wide uint8 RGB grid (HWC) on white, `padding` pixels around
    each; small images are enlarged (nearest neighbour) so a 16x16 digit is still readable. The layout of
    torchvision's make_grid, tiled here: importing torchvision cost each sampling stage about 1.9 s."""
    images = to_uint8(images[:max_images].cpu())
    scale = max(1, math.ceil(min_tile / images.shape[-1]))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # nearest neighbour
    n, channels, height, width = images.shape
    images = images.expand(n, 3, height, width) if channels == 1 else images
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = torch.full((3, rows * (height + padding) + padding, columns * (width + padding) + padding), 255,
                      dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, png_path: Path) -> None:
    """The grid of `images` as a PNG file, written atomically."""
    with atomic_open(png_path) as f:
        Image.fromarray(image_grid(images)).save(f, format="PNG")
