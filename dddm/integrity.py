"""Checksums of the files stages hand each other, checked when they are read: a damaged classifier,
reference statistics or samples file stops the stage naming the file and what to rerun, instead of
giving other scores with exit 0. And the samples file itself, written one batch at a time."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .files import atomic_open

SAMPLES_KEY = "images"
SAMPLES_SHA256_KEY = "images_sha256"


class IntegrityError(ValueError):
    """A file's content does not match its checksum, or it is not the file it should be; names the file."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(state_dict: dict) -> str:
    """A digest of a state dict's names and tensor bytes: what a weights file's own checksum covers."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_file_sha256(path: Path, expected: str | None, listed_in: Path, remedy: str) -> None:
    """IntegrityError naming `path` unless its sha256 is `expected` (as recorded in `listed_in`)."""
    if expected is None:
        raise IntegrityError(f"{path}: {listed_in} records no checksum for it (written by an older version); {remedy}")
    if file_sha256(path) != expected:
        raise IntegrityError(f"{path}: its sha256 differs from the one recorded in {listed_in} (the file was "
                             f"damaged or replaced); {remedy}")


def save_samples(batches: Iterable[np.ndarray], num: int, path: Path) -> None:
    """uint8 (B, C, H, W) batches, `num` images in all, into the npz `path` (keys `images` and
    `images_sha256`, the digest of the images' bytes), atomically and one batch at a time: memory
    holds one batch, whatever `num` is. np.load reads it as it reads np.savez_compressed's files."""
    h = hashlib.sha256()
    written = 0
    with atomic_open(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        member = None
        for batch in batches:
            batch = np.ascontiguousarray(batch, dtype=np.uint8)
            if member is None:
                header = {"descr": np.lib.format.dtype_to_descr(batch.dtype), "fortran_order": False,
                          "shape": (num, *batch.shape[1:])}
                member = zf.open(f"{SAMPLES_KEY}.npy", "w", force_zip64=True)
                np.lib.format.write_array_header_2_0(member, header)
            member.write(batch.tobytes())
            h.update(batch.tobytes())
            written += len(batch)
        if member is None:
            raise ValueError(f"{path}: no samples to write")
        member.close()
        if written != num:
            raise ValueError(f"{path}: {written} samples written, {num} expected")
        with zf.open(f"{SAMPLES_SHA256_KEY}.npy", "w") as digest:
            np.lib.format.write_array(digest, np.array(h.hexdigest()), allow_pickle=False)


def load_samples(path: Path, remedy: str) -> np.ndarray:
    """The images of a file written by `save_samples`, after checking them against their digest; a
    truncated, foreign or damaged file is an IntegrityError naming it and `remedy` (what to rerun)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: samples not found; {remedy}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, digest = npz[SAMPLES_KEY], str(npz[SAMPLES_SHA256_KEY])
    except KeyError as e:
        raise IntegrityError(f"{path}: not a samples file of the sample stage (no {e} array); {remedy}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file makes zipfile / numpy raise nearly anything
        raise IntegrityError(f"{path}: not a readable samples file (truncated, damaged or foreign: "
                             f"{type(e).__name__}: {e}); {remedy}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise IntegrityError(f"{path}: holds {images.dtype} images of shape {images.shape}, not uint8 (N, C, H, W); "
                             f"{remedy}")
    if hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() != digest:
        raise IntegrityError(f"{path}: the images do not match the file's checksum (the file was damaged); {remedy}")
    return images
