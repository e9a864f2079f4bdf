"""The store's Arrow IPC file: creating it (est_0 streamed, est_1 sparse, page aligned),
opening and validating it, and reading it with plain pyarrow (docs/store.md, "File layout")."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import mmap
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pyarrow as pa
import torch

from ..files import atomic_open
from .common import FORMAT, FORMAT_VERSION, StorageDtype, StoreError, compare_meta, fmt_bytes
from .tables import CHUNK_BYTES, FileTable

log = logging.getLogger(__name__)

_META_KEY = b"dddm.x0_store"
_PAD_KEY = b"dddm.pad"
_PAGE = 4096

# Arrays of at most 2^31 - 1 elements, as pyarrow writes by default and every Arrow implementation
# reads: a store with more values per slot is split into several record batches of equal rows.
MAX_ARRAY_ELEMENTS = 2**31 - 1


def _schema(meta: dict, dtype: StorageDtype, shape: tuple[int, ...], pad: int) -> pa.Schema:
    tensor = pa.fixed_shape_tensor(dtype.arrow, list(shape))
    return pa.schema([pa.field("est_0", tensor, nullable=False), pa.field("est_1", tensor, nullable=False),
                      pa.field("index", pa.int64(), nullable=False), pa.field("latest", pa.uint8(), nullable=False)],
                     metadata={_META_KEY: json.dumps(meta, sort_keys=True), _PAD_KEY: " " * pad})


class _Sink:
    """A file-like sink for pyarrow's IPC writer that writes the estimate buffers itself: est_0
    from the initial values (streamed, never held in memory), est_1 as a hole (sparse). It knows
    them by address: they are slices of a placeholder mapping that nothing ever reads."""

    def __init__(self, f, targets: dict[int, tuple[int, int, int]], fill: Callable):
        self.f, self.targets, self.fill = f, targets, fill
        self.first_offset: int | None = None
        self.closed = False

    def write(self, data) -> None:
        target = self.targets.get(data.address) if isinstance(data, pa.Buffer) else None
        if target is None:
            self.f.write(data)
            return
        slot, start, end = target
        if self.first_offset is None:
            self.first_offset = self.f.tell()
        if slot == 0:
            self.fill(self.f, start, end)
        else:
            self.f.seek(data.size, os.SEEK_CUR)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True


class _NullFile:
    """Counts bytes: for a dry run of the writer."""

    def __init__(self):
        self.pos = 0

    def write(self, data) -> None:
        self.pos += data.size if isinstance(data, pa.Buffer) else len(memoryview(data).cast("B"))

    def seek(self, k: int, whence: int) -> None:
        self.pos += k

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


def create_store_file(path: Path, meta: dict, dtype: StorageDtype, shape: tuple[int, ...], owned: np.ndarray,
                       source: Callable[[int, int], torch.Tensor]) -> None:
    """Write the store file (atomically: complete or absent), est_0 from `source`."""
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    n, numel = len(owned), math.prod(shape)
    row_bytes = numel * dtype.itemsize
    size = n * row_bytes
    chunk_rows = max(1, min(n, MAX_ARRAY_ELEMENTS // numel))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "file_id": uuid.uuid4().hex, "rows_per_batch": chunk_rows,
            "init": "dddm.rng.normal_per_index(index, shape, seed, STREAM_INITIAL_ESTIMATE)",
            "value_encoding": "bfloat16 bits in uint16" if dtype.name == "bfloat16" else dtype.name, **meta}
    holder = path.with_name(path.name + ".placeholder")
    # Stand-ins for the estimate buffers: a read-only map of a sparse file, slot 0 at 0, slot 1 after it.
    second = size + _PAGE
    with open(holder, "wb") as h:
        h.truncate(second + size + _PAGE)
    with open(holder, "rb") as h:
        placeholder = mmap.mmap(h.fileno(), second + size + _PAGE, access=mmap.ACCESS_READ)
    holder.unlink()
    base = batches = None
    try:
        base = pa.py_buffer(placeholder)
        tensor_type = pa.fixed_shape_tensor(dtype.arrow, list(shape))
        targets: dict[int, tuple[int, int, int]] = {}
        batches = []
        for start in range(0, n, chunk_rows):
            end = min(n, start + chunk_rows)
            columns = []
            for slot, origin in enumerate((0, second)):
                buf = base.slice(origin + start * row_bytes, (end - start) * row_bytes)
                targets[buf.address] = (slot, start, end)
                columns.append(pa.ExtensionArray.from_storage(tensor_type, pa.FixedSizeListArray.from_arrays(
                    pa.Array.from_buffers(dtype.arrow, (end - start) * numel, [None, buf]), numel)))
            columns += [pa.array(owned[start:end], pa.int64()), pa.array(np.zeros(end - start, np.uint8))]
            batches.append(columns)

        def write(f, fill, pad: int) -> int:
            sink = _Sink(f, targets, fill)
            schema = _schema(meta, dtype, shape, pad)
            with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), schema) as writer:
                for columns in batches:
                    writer.write_batch(pa.record_batch(columns, schema=schema))
            return sink.first_offset

        # A dry run finds where est_0 starts; padding the schema metadata then page-aligns it.
        offset = write(_NullFile(), lambda f, start, end: f.seek((end - start) * row_bytes, os.SEEK_CUR), 0)
        size0 = _schema(meta, dtype, shape, 0).serialize().size
        pad = next((p for p in range(0, 2 * _PAGE, 8)
                    if (offset + _schema(meta, dtype, shape, p).serialize().size - size0) % _PAGE == 0), 0)

        with tqdm(total=size, unit="B", unit_scale=True, desc=f"create {path.name}",
                  disable=size < (512 << 20)) as bar:
            def fill(f, start: int, end: int) -> None:
                step = max(1, CHUNK_BYTES // row_bytes)
                for lo in range(start, end, step):
                    hi = min(end, lo + step)
                    block = source(lo, hi).contiguous().view(dtype.bits_torch).numpy()
                    f.write(memoryview(block).cast("B"))
                    bar.update(block.nbytes)

            with atomic_open(path) as f:
                write(f, fill, pad)
    finally:
        del base, batches
        targets = None
        try:
            placeholder.close()
        except BufferError:  # pragma: no cover - still referenced; unmapped when collected
            pass
    log.info("created x0 store file %s (%s of estimates in two slots, %d record batch(es))", path,
             fmt_bytes(2 * size), -(-n // chunk_rows))


def lock_or_refuse(f, path: Path) -> None:
    """An exclusive lock on the open store file `f`: one writer per file, whatever run or clone it is."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(f"{path}: another training process has this store file open (it holds the file's lock); "
                         "stop it, or give this run another store.directory") from None


def remove_unused(path: Path) -> None:
    """Delete a store file that no process has open (under its lock); StoreError naming it if one has."""
    with open(path, "rb") as f:
        lock_or_refuse(f, path)
        path.unlink()


class StoreFile:
    """An opened, validated store file: numpy views of its Arrow buffers over one memory map."""

    def __init__(self, path: Path, expected: dict, dtype: StorageDtype, writable: bool):
        self.path, self.writable = Path(path), writable
        n, numel = expected["num_owned"], math.prod(expected["sample_shape"])
        shape = tuple(expected["sample_shape"])
        offsets = self._validate(expected, dtype, shape, n, numel)  # sets meta, file_id, chunk_rows
        self._fh = open(self.path, "r+b" if writable else "rb")
        try:
            if writable:  # held while open, dropped by the kernel when the holder dies
                lock_or_refuse(self._fh, self.path)
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        except Exception:
            self._fh.close()
            raise
        raw = np.frombuffer(self._mm, dtype=np.uint8)  # read-only for an ACCESS_READ map
        rows = [min(self.chunk_rows, n - start) for start in range(0, n, self.chunk_rows)]

        def views(name: str, np_dtype: np.dtype, width: int | None) -> list[np.ndarray]:
            out = []
            for k, count in enumerate(rows):
                nbytes = count * (width or 1) * np_dtype.itemsize
                arr = raw[offsets[k][name]:offsets[k][name] + nbytes].view(np_dtype)
                out.append(arr.reshape(count, width) if width else arr)
            return out
        # larger than about half the RAM available now: the rows mostly come from disk
        self.from_disk = 2 * n * numel * dtype.itemsize > 0.5 * psutil.virtual_memory().available
        fd = self._fh.fileno() if writable else None
        self.tables = [FileTable(views(name, dtype.bits, numel), self.chunk_rows,
                                  [o[name] for o in offsets], dtype, self._mm, fd, self.from_disk)
                       for name in ("est_0", "est_1")]
        self.latest = views("latest", np.dtype(np.uint8), None)
        index = np.concatenate(views("index", np.dtype(np.int64), None))
        want = np.arange(expected["rank"], expected["num_samples"], expected["world_size"], dtype=np.int64)
        if not np.array_equal(index, want):
            self.close()
            raise StoreError(f"{self.path}: the index column does not hold the {n} indices rank "
                             f"{expected['rank']} of {expected['world_size']} owns")

    def set_latest(self, values: np.ndarray) -> None:
        for k, part in enumerate(self.latest):
            part[:] = values[k * self.chunk_rows:k * self.chunk_rows + len(part)]

    def _validate(self, expected: dict, dtype: StorageDtype, shape, n: int, numel: int) -> list[dict[str, int]]:
        path = self.path
        try:
            source = pa.memory_map(str(path), "r")
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{path}: cannot open the store file ({e})") from e
        try:
            try:
                reader = pa.ipc.open_file(source)
            except (pa.ArrowException, OSError) as e:
                raise StoreError(f"{path}: not a valid Arrow IPC file, truncated or corrupt ({e})") from e
            self._check_header(source, reader.schema)
            md = reader.schema.metadata or {}
            if _META_KEY not in md:
                raise StoreError(f"{path}: an Arrow file but not an x0 store (no {_META_KEY.decode()} "
                                 f"in its schema metadata)")
            try:
                meta = json.loads(md[_META_KEY])
            except ValueError as e:
                raise StoreError(f"{path}: unreadable {_META_KEY.decode()} metadata ({e})") from e
            if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                raise StoreError(f"{path}: store format {meta.get('format')!r} version {meta.get('version')!r}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
            compare_meta(expected, meta, str(path))
            self.file_id, self.meta = meta["file_id"], meta
            self.chunk_rows = int(meta.get("rows_per_batch", 0))
            if self.chunk_rows < 1:
                raise StoreError(f"{path}: rows_per_batch is {meta.get('rows_per_batch')!r}")
            tensor = pa.fixed_shape_tensor(dtype.arrow, list(shape))
            want = {"est_0": tensor, "est_1": tensor, "index": pa.int64(), "latest": pa.uint8()}
            for name, typ in want.items():
                idx = reader.schema.get_field_index(name)
                if idx < 0 or not reader.schema.field(idx).type.equals(typ):
                    found = reader.schema.field(idx).type if idx >= 0 else "<missing>"
                    raise StoreError(f"{path}: column {name!r} is {found}, expected {typ}")
            num_batches = -(-n // self.chunk_rows)
            if reader.num_record_batches != num_batches:
                raise StoreError(f"{path}: {reader.num_record_batches} record batches, expected {num_batches} "
                                 f"of {self.chunk_rows} rows")
            source.seek(0)
            base = source.read_buffer(1).address
            file_size = os.path.getsize(path)
            itemsize = dtype.itemsize
            align = {"est_0": itemsize, "est_1": itemsize, "index": 8, "latest": 1}
            offsets = []
            for k in range(num_batches):
                rows = min(self.chunk_rows, n - k * self.chunk_rows)
                try:
                    batch = reader.get_batch(k)
                except (pa.ArrowException, OSError) as e:
                    raise StoreError(f"{path}: record batch {k} cannot be read, truncated or corrupt ({e})") from e
                if batch.num_rows != rows:
                    raise StoreError(f"{path}: record batch {k} has {batch.num_rows} rows, expected {rows}")
                sizes = {"est_0": rows * numel * itemsize, "est_1": rows * numel * itemsize,
                         "index": 8 * rows, "latest": rows}
                where = {}
                for name, nbytes in sizes.items():
                    col = batch.column(name)
                    arr = col.storage.values if name.startswith("est") else col
                    if arr.offset != 0 or (name.startswith("est") and col.storage.offset != 0):
                        raise StoreError(f"{path}: column {name!r} is a slice; expected a plain buffer")
                    buf = arr.buffers()[1]
                    if buf is None or buf.size < nbytes:
                        raise StoreError(f"{path}: column {name!r} of record batch {k} holds "
                                         f"{0 if buf is None else buf.size} bytes, expected {nbytes}")
                    off = buf.address - base
                    if off < 0 or off + nbytes > file_size or off % align[name]:
                        raise StoreError(f"{path}: column {name!r} of record batch {k} at byte {off} is "
                                         f"outside the file or misaligned")
                    where[name] = off
                offsets.append(where)
                del batch
            del reader
            return offsets
        finally:
            source.close()

    def _check_header(self, source, schema: pa.Schema) -> None:
        """The file's leading magic and schema, which pyarrow's file reader skips (it reads the
        footer's copy), so that a damaged header is reported rather than left for other readers."""
        source.seek(0)
        try:
            if source.read(6) != b"ARROW1":
                raise ValueError("no ARROW1 magic at the start")
            source.seek(8)
            if not pa.ipc.read_schema(source).equals(schema, check_metadata=True):
                raise ValueError("the schema at the start differs from the footer's")
        except (ValueError, pa.ArrowException, OSError) as e:
            raise StoreError(f"{self.path}: damaged header ({e})") from e

    def flush(self) -> None:
        """Write everything to disk: stores into the map and pwrites both sit in the page cache."""
        if self.writable:
            os.fdatasync(self._fh.fileno())

    def close(self) -> None:
        if self._mm is None:
            return
        self.flush()
        self.tables = self.latest = None
        try:
            self._mm.close()
        except BufferError:  # a view still exported (e.g. a caller's tensor): unmapped when collected
            pass
        self._fh.close()
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_store_file(path) -> dict:
    """The newest estimates in a store file as of its last flush, read with plain pyarrow (all in
    memory): {"meta": the file's metadata, "index": int64 (n,), "estimates": float32 (n, *shape)}.
    The same for any Arrow reader: per row, est_0 where latest == 0 and est_1 where latest == 1;
    for bfloat16 the values are uint16 bits (shift left by 16 and read as float32)."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    meta = json.loads(table.schema.metadata[_META_KEY])
    shape = tuple(meta["sample_shape"])
    slots = [np.concatenate([chunk.storage.flatten().to_numpy(zero_copy_only=False)
                             for chunk in table.column(name).chunks]).reshape(len(table), *shape)
             for name in ("est_0", "est_1")]
    latest = table.column("latest").to_numpy().astype(bool).reshape(-1, *([1] * len(shape)))
    est = np.where(latest, slots[1], slots[0])
    if meta["dtype"] == "bfloat16":
        est = (est.astype(np.uint32) << 16).view(np.float32)
    return {"meta": meta, "index": table.column("index").to_numpy(), "estimates": est.astype(np.float32)}
