"""Dataset sources -> one prepared on-disk format, and loading it for training and scoring.

The prepared format is an uncompressed Arrow IPC file holding one record batch:
- `image`: fixed_size_list<uint8>[C*H*W], each row one image in CHW order, values 0..255;
- `label`: int64.
Schema metadata (all strings): channels, height, width, num_samples, num_classes, source and
fingerprint, the sha256 of the shape, the image bytes and the labels (little-endian int64).
Being uncompressed, the file is read through a memory map without copying: a batch reads only
its own rows.

Sources (`prepare_dataset`):
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), 1 channel;
- `cifar10`: `cifar-10-python.tar.gz` (or its extracted `cifar-10-batches-py` directory), the
  50000 training images of data_batch_1..5, 3 channels;
- `imagenet64`: downsampled ImageNet 64x64 (Chrabaszcz, Loshchilov & Hutter 2017), the directory
  holding `train_data_batch_1..10`, each a pickled dict (or the same name + `.npz`, the numpy
  variant) with `data` uint8 (N, 12288) rows of CHW planes (RGB) and `labels`, which the release
  numbers 1..1000; they are stored 0-based (label - 1), 1000 classes, 1281167 images. Streamed:
  only one source batch is in memory at a time (see `_prepare_imagenet64`);
- `folder`: png/jpg/jpeg files found recursively, as RGB, resized so the short side is
  `image_size` and center-cropped; when every image lies in a subfolder, the label is the index
  of its first-level subfolder among the sorted names, else every label is 0.
Paths may be local or any fsspec URL. All resizing is PIL's bilinear (antialiased when
shrinking), whose 8-bit arithmetic is exact, so a fingerprint does not depend on the machine.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm import tqdm

from .files import atomic_open
from .pixels import to_float

SOURCES = ("digits", "cifar10", "folder", "imagenet64")
MIN_IMAGE_SIZE = 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGENET64_BATCHES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
IMAGENET64_CLASSES = 1000
RESAMPLE = Image.Resampling.BILINEAR


class DataError(ValueError):
    """A dataset source or prepared file is missing, malformed or of the wrong kind."""


@dataclass(frozen=True)
class PreparedInfo:
    fingerprint: str
    num_samples: int
    channels: int
    image_size: int
    num_classes: int  # the largest label + 1
    source: str


# ---------------------------------------------------------------------------------------------
# Preparing


def prepare_dataset(source: str, path: str | None, image_size: int, out_path: str | Path, *,
                    progress: bool = True) -> PreparedInfo:
    """Read `source` (at `path`, a local path or fsspec URL; unused for digits), resize to
    `image_size` and write the prepared file `out_path` atomically."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"{source}: image_size {image_size} is below the minimum {MIN_IMAGE_SIZE}")
    if source == "digits":
        images, labels = _read_digits(image_size, progress)
    else:
        fs, root = _locate(source, path)
        if source == "imagenet64":
            return _prepare_imagenet64(fs, root, path, image_size, Path(out_path), progress)
        reader = _read_cifar10 if source == "cifar10" else _read_folder
        images, labels = reader(fs, root, path, image_size, progress)
    return _write(images, labels, source, Path(out_path))


def local_path_problem(source: str, path: str | None) -> str | None:
    """Why a local `path` that exists cannot be `source`'s input, or None. A FIFO or a device (/dev/zero) would
    block or never end the prepare stage's read, after DVC has deleted its outputs; the check stage asks this
    first. A missing path or a URL is left to the prepare stage (a clone may hold the prepared file without
    the source)."""
    if source == "digits" or not path or fsspec.utils.get_protocol(path) not in ("file", "local"):
        return None
    try:
        mode = os.stat(fsspec.core.url_to_fs(path)[1]).st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and source == "cifar10"):
        return None
    kind = "a file" if stat.S_ISREG(mode) else "not a regular file or directory (a FIFO, device or socket)"
    return f"{path} is {kind}; data.source {source} reads {'an archive or ' if source == 'cifar10' else ''}a directory"


def _locate(source: str, path: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    if not path:
        raise DataError(f"{source}: a path is required (a local path or fsspec URL)")
    if (why := local_path_problem(source, path)) is not None:
        raise DataError(f"{source}: {why}")
    try:
        fs, root = fsspec.core.url_to_fs(str(path))
        exists = fs.exists(root)
    except (ImportError, ValueError, OSError) as e:
        raise DataError(f"{source}: cannot open {path}: {e}") from e
    if not exists:
        raise DataError(f"{source}: {path} does not exist")
    return fs, root.rstrip("/")


def _read_digits(image_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # here: a 2 s import that only this source needs

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return _resize(images, image_size, progress), digits.target.astype(np.int64)


def _read_cifar10(fs: fsspec.AbstractFileSystem, root: str, path: str, image_size: int,
                  progress: bool) -> tuple[np.ndarray, np.ndarray]:
    batches = {}
    if fs.isdir(root):  # an extracted cifar-10-batches-py directory
        for name in CIFAR_BATCHES:
            if fs.isfile(f"{root}/{name}"):
                with fs.open(f"{root}/{name}", "rb") as f:
                    batches[name] = _load_cifar_batch(f, f"{path}/{name}")
    else:
        try:
            with fs.open(root, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
                # Walked in order, never seeking back: a gzip stream rewinds by decompressing again.
                for member in tqdm(tar, desc="cifar10", unit=" members", disable=not progress):
                    name = posixpath.basename(member.name)
                    if member.isfile() and name in CIFAR_BATCHES:
                        batches[name] = _load_cifar_batch(tar.extractfile(member), f"{path}:{member.name}")
                if isinstance(tar.fileobj, gzip.GzipFile):
                    # The gzip CRC sits at the end of the stream, after the tar's end marker: read up to
                    # it, so a file with bytes changed in the middle is refused, not trained on.
                    while tar.fileobj.read(1 << 20):
                        pass
        except gzip.BadGzipFile as e:
            raise DataError(f"cifar10: {path} is corrupted ({e}); download cifar-10-python.tar.gz again") from e
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise DataError(f"cifar10: {path} is not a CIFAR-10 archive (cifar-10-python.tar.gz): {e}") from e
    missing = [name for name in CIFAR_BATCHES if name not in batches]
    if missing:
        raise DataError(f"cifar10: {path} is not a CIFAR-10 archive or cifar-10-batches-py directory: "
                        f"no {', '.join(missing)}")
    images = np.concatenate([batches[name][0] for name in CIFAR_BATCHES])
    labels = np.concatenate([batches[name][1] for name in CIFAR_BATCHES])
    return _resize(images, image_size, progress), labels


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's and downsampled ImageNet's batches are pickles; this refuses any global but what
    a batch needs (numpy arrays, pickled by any protocol), so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(f, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch {b"data": uint8 (N, 3072) CHW rows, b"labels": N ints} -> (N, 3, 32, 32), labels."""
    try:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # garbage makes pickle raise nearly any exception type
        raise DataError(f"cifar10: {where} is not a CIFAR-10 batch: {type(e).__name__}: {e}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),) \
            or np.any((labels < 0) | (labels > 9)):
        raise DataError(f"cifar10: {where} is not a CIFAR-10 batch: data {data.dtype} {data.shape}, "
                        f"labels {labels.shape} (expected uint8 (N, 3072) and N labels in 0..9)")
    return data.reshape(-1, 3, 32, 32), labels


def _prepare_imagenet64(fs: fsspec.AbstractFileSystem, root: str, path: str, image_size: int, out_path: Path,
                        progress: bool) -> PreparedInfo:
    """Stream the 10 batches into a raw image file beside `out_path` (one batch in memory at a
    time), then write the prepared file from a memory map of it: the fingerprint's hash needs the
    image count first, and the Arrow record batch its length, both known only at the end.
    Needs the prepared file's size once more on disk, for the raw file, until the end."""
    if not fs.isdir(root):
        raise DataError(f"imagenet64: {path} is not a directory (expected train_data_batch_1..10 inside)")
    names = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
    files = [name if name in names else f"{name}.npz" for name in IMAGENET64_BATCHES]
    missing = [name for name, file in zip(IMAGENET64_BATCHES, files) if file not in names]
    if missing:
        raise DataError(f"imagenet64: {path} lacks {', '.join(missing)} (nor their .npz variants); "
                        f"all of train_data_batch_1..10 are needed")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = out_path.with_name(f".{out_path.name}.images")  # as atomic_open's: a crash leaves one, replaced next time
    labels = []
    try:
        with open(raw, "wb") as out:
            for file in tqdm(files, desc="imagenet64", unit=" batches", disable=not progress):
                with fs.open(f"{root}/{file}", "rb") as f:
                    images, batch_labels = _load_imagenet64_batch(f, file.endswith(".npz"), f"{path}/{file}")
                out.write(np.ascontiguousarray(_resize(images, image_size, progress=False)).data)
                labels.append(batch_labels)
                del images  # before the next batch is read: one batch in memory at a time
        labels = np.concatenate(labels)
        images = np.memmap(raw, dtype=np.uint8, mode="r", shape=(len(labels), 3, image_size, image_size))
        return _write(images, labels, "imagenet64", out_path)
    finally:
        raw.unlink(missing_ok=True)


def _load_imagenet64_batch(f, is_npz: bool, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch {data: uint8 (N, 12288) CHW rows, labels: N ints in 1..1000} -> (N, 3, 64, 64), labels - 1."""
    try:
        if is_npz:
            with np.load(f, allow_pickle=False) as npz:
                data, labels = npz["data"], npz["labels"]
        else:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            data, labels = batch["data"], batch["labels"]
        data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    except Exception as e:  # a truncated or foreign file makes pickle / zipfile raise nearly anything
        raise DataError(f"imagenet64: {where} is not a downsampled-ImageNet batch (truncated or another format): "
                        f"{type(e).__name__}: {e}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64 or labels.shape != (len(data),):
        raise DataError(f"imagenet64: {where} has data {data.dtype} {data.shape} and labels {labels.shape}; "
                        f"expected uint8 (N, 12288) (3x64x64 CHW rows) and N labels")
    if len(labels) and (labels.min() < 1 or labels.max() > IMAGENET64_CLASSES):
        raise DataError(f"imagenet64: {where} has labels in {labels.min()}..{labels.max()}; the format's are "
                        f"1..{IMAGENET64_CLASSES}")
    return data.reshape(-1, 3, 64, 64), labels - 1


def _read_folder(fs: fsspec.AbstractFileSystem, root: str, path: str, image_size: int,
                 progress: bool) -> tuple[np.ndarray, np.ndarray]:
    if not fs.isdir(root):
        raise DataError(f"folder: {path} is not a directory")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    relative = [p[len(root):].lstrip("/") for p in files]
    if all("/" in r for r in relative):
        classes = sorted({r.split("/", 1)[0] for r in relative})
        labels = np.array([classes.index(r.split("/", 1)[0]) for r in relative], dtype=np.int64)
    else:
        labels = np.zeros(len(files), dtype=np.int64)
    images = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    for i, file in enumerate(tqdm(files, desc="folder", unit=" images", disable=not progress)):
        try:
            with fs.open(file, "rb") as f:
                image = Image.open(io.BytesIO(f.read())).convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"folder: cannot decode image {file}: {e}") from e
        images[i] = _chw(_center_crop(image, image_size))
    return images, labels


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is `size`, then cut the central size x size square."""
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), RESAMPLE)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _chw(image: Image.Image) -> np.ndarray:
    a = np.asarray(image)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _resize(images: np.ndarray, size: int, progress: bool) -> np.ndarray:
    """(N, C, h, w) uint8, C = 1 or 3 -> (N, C, size, size) uint8."""
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), dtype=np.uint8)
    for i in tqdm(range(len(images)), desc="resize", unit=" images", disable=not progress):
        hwc = images[i].transpose(1, 2, 0)
        out[i] = _chw(Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc).resize((size, size), RESAMPLE))
    return out


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the shape (N, C, H, W), the uint8 image bytes and the labels as little-endian int64."""
    h = hashlib.sha256(",".join(map(str, images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.uint8).reshape(-1).data)
    h.update(np.ascontiguousarray(labels, dtype="<i8").data)
    return h.hexdigest()


def _write(images: np.ndarray, labels: np.ndarray, source: str, out_path: Path) -> PreparedInfo:
    n, c, h, w = images.shape
    info = PreparedInfo(fingerprint=fingerprint(images, labels), num_samples=n, channels=c, image_size=h,
                        num_classes=int(labels.max()) + 1, source=source)
    metadata = {"channels": c, "height": h, "width": w, "num_samples": n, "num_classes": info.num_classes,
                "source": source, "fingerprint": info.fingerprint}
    # Wrapped, not converted: pa.array would copy a read-only memory map (the streamed sources' images).
    # Fixed-size binary, one value per image: Arrow IPC caps an array's length at 2^31 - 1, which a list
    # of uint8 values passes at 175k images of 3x64x64 (ImageNet's 1.28M would not fit in one batch).
    flat = np.ascontiguousarray(images).reshape(-1)
    image_column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(flat)])
    schema = pa.schema([("image", image_column.type), ("label", pa.int64())],
                       metadata={k: str(v) for k, v in metadata.items()})
    batch = pa.record_batch([image_column, pa.array(labels, type=pa.int64())], schema=schema)

    with atomic_open(out_path) as f, pa.ipc.new_file(f, schema) as writer:
        writer.write_batch(batch)
    return info


# ---------------------------------------------------------------------------------------------
# Loading


class PreparedDataset(torch.utils.data.Dataset):
    """A prepared file, memory-mapped. Items are (image float (C, H, W) in [-1, 1], label, index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no prepared dataset there (run the prepare stage)")
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
            schema, num_batches = reader.schema, reader.num_record_batches
            batch = reader.get_batch(0) if num_batches == 1 else None
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: not a prepared dataset (unreadable or truncated Arrow file): {e}") from e
        self.info = _validate(self.path, schema, batch)
        c, s = self.info.channels, self.info.image_size
        # Zero-copy views on the memory map; indexing them reads only the rows asked for.
        images = batch.column("image")
        self._images = np.frombuffer(images.buffers()[1], dtype=np.uint8, count=len(images) * c * s * s,
                                     offset=images.offset * c * s * s).reshape(-1, c, s, s)
        self._labels = batch.column("label").to_numpy(zero_copy_only=True)

    def __len__(self) -> int:
        return self.info.num_samples

    @property
    def stored_images(self) -> np.ndarray:
        """Every image as stored, uint8 (N, C, H, W), a view of the memory map: reading it batch by batch
        (feature extraction) never holds the dataset in memory (ImageNet 64x64 as float32: 63 GB)."""
        return self._images

    def images(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 (B, C, H, W) in [-1, 1], u / 127.5 - 1 for the stored uint8 u."""
        return to_float(torch.from_numpy(self._images[_index_array(indices)]))

    def labels(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._labels[_index_array(indices)])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images([i])[0], int(self._labels[i]), i

    def __reduce__(self):
        # Reopen by path in DataLoader worker processes instead of pickling the memory map.
        return PreparedDataset, (self.path,)


def _index_array(indices) -> np.ndarray:
    return np.atleast_1d(np.asarray(indices, dtype=np.int64))


def _validate(path: Path, schema: pa.Schema, batch: pa.RecordBatch | None) -> PreparedInfo:
    def bad(why: str) -> DataError:
        return DataError(f"{path}: not a prepared dataset: {why}")

    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    missing = [k for k in ("channels", "height", "width", "num_samples", "num_classes", "source", "fingerprint")
               if k not in meta]
    if missing:
        raise bad(f"metadata lacks {', '.join(missing)}")
    try:
        c, h, w, n, k = (int(meta[key]) for key in ("channels", "height", "width", "num_samples", "num_classes"))
    except ValueError as e:
        raise bad(f"metadata: {e}") from e
    image_type = pa.binary(c * h * w)
    if schema.names != ["image", "label"] or schema.field("image").type != image_type \
            or schema.field("label").type != pa.int64():
        raise bad(f"columns {schema} (expected image: {image_type}, label: int64)")
    if h != w:
        raise bad(f"images are {h}x{w}, not square")
    if batch is None or batch.num_rows != n:
        raise bad(f"expected one record batch of {n} rows")
    if batch.column("image").offset or batch.column("image").null_count or batch.column("label").null_count:
        raise bad("sliced or null entries")
    return PreparedInfo(fingerprint=meta["fingerprint"], num_samples=n, channels=c, image_size=h, num_classes=k,
                        source=meta["source"])
