import io
import os
import pickle
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from dddm.data import DataError, PreparedDataset, PreparedInfo, prepare_dataset

PER_BATCH = 4  # 5 training batches of 4 images: 20 images, labels 0..9 twice


# ---------------------------------------------------------------------------------------------
# Source fixtures in the real formats


def cifar_batch(images: np.ndarray, labels: list[int], name: str) -> bytes:
    """A batch pickled as the real archive's: a dict with bytes keys, data uint8 (N, 3072) CHW rows."""
    return pickle.dumps({b"batch_label": name.encode(), b"labels": labels,
                         b"data": images.reshape(len(images), -1),
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}, protocol=2)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def cifar_source():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * PER_BATCH, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(5 * PER_BATCH) % 10
    members = {"cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2),
               "cifar-10-batches-py/readme.html": b"<html></html>"}
    for b in range(5):
        rows = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
        members[f"cifar-10-batches-py/data_batch_{b + 1}"] = cifar_batch(images[rows], labels[rows].tolist(),
                                                                          f"training batch {b + 1} of 5")
    test_images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    members["cifar-10-batches-py/test_batch"] = cifar_batch(test_images, [0, 1, 2], "testing batch 1 of 1")
    return images, labels, members


@pytest.fixture
def cifar_archive(tmp_path, cifar_source):
    return write_tar(tmp_path / "cifar-10-python.tar.gz", cifar_source[2])


@pytest.fixture
def memfs():
    """A unique root on fsspec's in-memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder_files():
    """Relative path -> file bytes: class subfolders, sorted cat (0) before dog (1), png and jpg, and a
    24x12 image whose center crop is known exactly. Sizes are already 12 on the short side."""
    rng = np.random.default_rng(1)
    pixels = {name: rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for name in ("a", "b", "c")}
    pixels["wide"] = rng.integers(0, 256, (12, 24, 3), dtype=np.uint8)
    files = {"dog/a.png": png_bytes(pixels["a"]), "cat/b.jpg": png_bytes(pixels["b"], "JPEG"),
             "cat/sub/c.PNG": png_bytes(pixels["c"]), "dog/wide.jpeg": png_bytes(pixels["wide"], "JPEG"),
             "dog/notes.txt": b"not an image"}
    return files, pixels


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# cifar10


@pytest.mark.parametrize("where", ["local", "file_url", "memory_url", "extracted_directory"])
def test_cifar10_pixels_and_labels_exact(where, tmp_path, cifar_source, cifar_archive, memfs):
    images, labels, members = cifar_source
    if where == "local":
        path = str(cifar_archive)
    elif where == "file_url":
        path = f"file://{cifar_archive}"
    elif where == "memory_url":
        fs, root = memfs
        fs.pipe(f"{root}/cifar-10-python.tar.gz", cifar_archive.read_bytes())
        path = f"memory://{root}/cifar-10-python.tar.gz"
    else:
        with tarfile.open(cifar_archive) as tar:
            tar.extractall(tmp_path, filter="data")
        path = str(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "out" / "prepared.arrow"
    info = prepare_dataset("cifar10", path, 32, out, progress=False)
    assert info == PreparedInfo(fingerprint=info.fingerprint, num_samples=20, channels=3, image_size=32,
                                num_classes=10, source="cifar10")
    ds = PreparedDataset(out)
    assert ds.info == info and len(ds) == 20  # the test batch is left out
    assert np.array_equal(ds._images, images) and ds._images.dtype == np.uint8
    assert torch.equal(ds.labels(range(20)), torch.as_tensor(labels, dtype=torch.int64))
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared.arrow"]  # no temporary left


def test_cifar10_resized(tmp_path, cifar_archive, cifar_source):
    info = prepare_dataset("cifar10", str(cifar_archive), 16, tmp_path / "p.arrow", progress=False)
    ds = PreparedDataset(tmp_path / "p.arrow")
    assert (info.image_size, info.channels) == (16, 3) and ds._images.shape == (20, 3, 16, 16)
    first = Image.fromarray(cifar_source[0][0].transpose(1, 2, 0)).resize((16, 16), Image.Resampling.BILINEAR)
    assert np.array_equal(ds._images[0], np.asarray(first).transpose(2, 0, 1))


def test_fingerprint_stable_and_sensitive(tmp_path, cifar_source, cifar_archive):
    a = prepare_dataset("cifar10", str(cifar_archive), 32, tmp_path / "a.arrow", progress=False)
    b = prepare_dataset("cifar10", f"file://{cifar_archive}", 32, tmp_path / "b.arrow", progress=False)
    assert a.fingerprint == b.fingerprint == PreparedDataset(tmp_path / "a.arrow").info.fingerprint
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()

    images, labels, members = cifar_source
    changed = images[3 * PER_BATCH: 4 * PER_BATCH].copy()
    changed[1, 2, 17, 5] ^= 1  # one pixel of image 13, off by one
    members = {**members, "cifar-10-batches-py/data_batch_4": cifar_batch(
        changed, labels[3 * PER_BATCH: 4 * PER_BATCH].tolist(), "training batch 4 of 5")}
    c = prepare_dataset("cifar10", str(write_tar(tmp_path / "changed.tar.gz", members)), 32, tmp_path / "c.arrow",
                        progress=False)
    assert c.fingerprint != a.fingerprint


# ---------------------------------------------------------------------------------------------
# folder


@pytest.mark.parametrize("where", ["local", "memory_url"])
def test_folder_classes_crop_and_pixels(where, tmp_path, memfs, folder_files):
    files, pixels = folder_files
    if where == "local":
        path = str(write_files(tmp_path / "images", files))
    else:
        fs, root = memfs
        for name, data in files.items():
            fs.pipe(f"{root}/images/{name}", data)
        path = f"memory://{root}/images/"
    info = prepare_dataset("folder", path, 12, tmp_path / "p.arrow", progress=False)
    assert (info.num_samples, info.channels, info.image_size, info.num_classes) == (4, 3, 12, 2)
    ds = PreparedDataset(tmp_path / "p.arrow")
    # sorted paths: cat/b.jpg, cat/sub/c.PNG, dog/a.png, dog/wide.jpeg
    assert ds.labels([0, 1, 2, 3]).tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds._images[0], decoded(files["cat/b.jpg"]))
    assert np.array_equal(ds._images[1], pixels["c"].transpose(2, 0, 1))
    assert np.array_equal(ds._images[2], pixels["a"].transpose(2, 0, 1))
    assert np.array_equal(ds._images[3], decoded(files["dog/wide.jpeg"])[:, :, 6:18])  # the central 12 columns


def test_folder_flat_resizes_and_labels_zero(tmp_path):
    rng = np.random.default_rng(2)
    root = write_files(tmp_path / "flat", {
        "x.png": png_bytes(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)),  # 30 wide, 40 high
        "y.jpg": png_bytes(rng.integers(0, 256, (20, 20), dtype=np.uint8), "JPEG")})  # grayscale -> RGB
    info = prepare_dataset("folder", str(root), 15, tmp_path / "p.arrow", progress=False)
    ds = PreparedDataset(tmp_path / "p.arrow")
    assert (info.num_classes, ds._images.shape) == (1, (2, 3, 15, 15))
    assert ds.labels([0, 1]).tolist() == [0, 0]
    expected = Image.open(root / "x.png").resize((15, 20), Image.Resampling.BILINEAR).crop((0, 2, 15, 17))
    assert np.array_equal(ds._images[0], np.asarray(expected).transpose(2, 0, 1))
    assert np.array_equal(ds._images[1][0], ds._images[1][2])


def test_folder_fingerprint_changes_with_one_pixel(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    root = write_files(tmp_path / "f", {"a.png": png_bytes(pixels)})
    first = prepare_dataset("folder", str(root), 8, tmp_path / "p.arrow", progress=False)
    assert prepare_dataset("folder", str(root), 8, tmp_path / "p.arrow", progress=False) == first
    pixels[4, 4, 1] += 1
    write_files(root, {"a.png": png_bytes(pixels)})
    assert prepare_dataset("folder", str(root), 8, tmp_path / "p.arrow", progress=False).fingerprint \
        != first.fingerprint


# ---------------------------------------------------------------------------------------------
# digits and loading


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "prepared.arrow"
    return prepare_dataset("digits", None, 16, out, progress=False), out


def test_digits(digits16, tmp_path):
    info, out = digits16
    assert info == PreparedInfo(fingerprint=info.fingerprint, num_samples=1797, channels=1, image_size=16,
                                num_classes=10, source="digits")
    ds = PreparedDataset(out)
    digits = load_digits()
    assert ds._images.shape == (1797, 1, 16, 16)
    assert np.array_equal(ds._labels, digits.target)
    assert ds._images.max() == 255 and ds._images.min() == 0
    prepare_dataset("digits", None, 8, tmp_path / "8.arrow", progress=False)  # native size: no resampling
    native = PreparedDataset(tmp_path / "8.arrow")._images
    assert np.array_equal(native[:, 0], np.round(digits.images * 255 / 16).astype(np.uint8))


def test_images_in_range_and_matching_uint8(digits16):
    ds = PreparedDataset(digits16[1])
    for idx in ([5, 0, 1796, 5], np.array([3, 2]), torch.tensor([7, 1000])):
        x = ds.images(idx)
        assert x.dtype == torch.float32 and x.shape == (len(idx), 1, 16, 16)
        assert x.min() >= -1 and x.max() <= 1
        u = torch.from_numpy(ds._images[np.asarray(idx)]).float()
        assert torch.allclose((x + 1) * 127.5, u, atol=1e-4)
        assert ds.labels(idx).dtype == torch.int64
    assert ds.images([0, 1796]).min() == -1 and ds.images(range(1797)).max() == 1
    assert not ds._images.flags.owndata  # a view on the memory map, not a copy


def test_dataloader_yields_indices(digits16):
    ds = PreparedDataset(digits16[1])
    seen = []
    for images, labels, idx in DataLoader(ds, batch_size=256, shuffle=True,
                                          generator=torch.Generator().manual_seed(0)):
        assert torch.equal(images, ds.images(idx)) and torch.equal(labels, ds.labels(idx))
        seen += idx.tolist()
    assert sorted(seen) == list(range(1797))
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert clone.info == ds.info and torch.equal(clone.images([9]), ds.images([9]))


# ---------------------------------------------------------------------------------------------
# Errors


def test_cheap_checks(tmp_path):
    with pytest.raises(DataError, match=r"unknown data source 'mnist'.*digits, cifar10, folder"):
        prepare_dataset("mnist", None, 16, tmp_path / "p.arrow")
    for source in ("cifar10", "folder"):
        with pytest.raises(DataError, match=f"^{source}: a path is required"):
            prepare_dataset(source, None, 16, tmp_path / "p.arrow")
        missing = tmp_path / "nowhere"
        with pytest.raises(DataError, match=f"^{source}: {missing} does not exist"):
            prepare_dataset(source, str(missing), 16, tmp_path / "p.arrow")
    with pytest.raises(DataError, match="^digits: image_size 4 is below the minimum 8"):
        prepare_dataset("digits", None, 4, tmp_path / "p.arrow")
    assert not (tmp_path / "p.arrow").exists()


@pytest.mark.timeout(60)  # before the fix, opening the FIFO blocked for ever
def test_a_fifo_or_a_device_is_refused_unread(tmp_path):
    """Issue 32: a FIFO or /dev/zero as data.path hung the prepare stage (the check stage refuses it first, through
    the same function: tests/test_refused_before_deletion.py)."""
    fifo = tmp_path / "cifar-10-python.tar.gz"
    os.mkfifo(fifo)
    for source, path in (("cifar10", fifo), ("cifar10", "/dev/zero"), ("imagenet64", "/dev/zero")):
        with pytest.raises(DataError, match=f"^{source}: {path} is not a regular file or directory"):
            prepare_dataset(source, str(path), 16, tmp_path / "p.arrow")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=f"^folder: {tmp_path / 'a.png'} is a file; data.source folder reads a dir"):
        prepare_dataset("folder", str(tmp_path / "a.png"), 16, tmp_path / "p.arrow")
    assert not (tmp_path / "p.arrow").exists()


def test_cifar10_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match=f"^cifar10: {junk} is not a CIFAR-10 archive"):
        prepare_dataset("cifar10", str(junk), 32, tmp_path / "p.arrow", progress=False)


@pytest.mark.parametrize("level", [0, 9])
def test_cifar10_archive_with_bytes_changed_in_the_middle(tmp_path, cifar_source, cifar_archive, level):
    """Level 0 (stored blocks) decompresses the changed pixels without complaint: only the gzip CRC at
    the end of the stream catches them. Level 9 may fail earlier; either way the file is named."""
    archive = tmp_path / "changed.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=level) as tar:
        for name, data in cifar_source[2].items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    prepare_dataset("cifar10", str(archive), 32, tmp_path / "ok.arrow", progress=False)
    data = bytearray(archive.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 16] = bytes(b ^ 0x5A for b in data[middle: middle + 16])
    archive.write_bytes(bytes(data))
    match = f"^cifar10: {archive} is corrupted .*CRC" if level == 0 else f"^cifar10: {archive}"
    with pytest.raises(DataError, match=match):
        prepare_dataset("cifar10", str(archive), 32, tmp_path / "p.arrow", progress=False)
    assert not (tmp_path / "p.arrow").exists()


def test_cifar10_tar_without_members(tmp_path, cifar_source):
    members = {k: v for k, v in cifar_source[2].items() if not k.endswith(("_3", "_5"))}
    archive = write_tar(tmp_path / "partial.tar.gz", members)
    with pytest.raises(DataError, match=f"^cifar10: {archive} is not a CIFAR-10 .* no data_batch_3, data_batch_5$"):
        prepare_dataset("cifar10", str(archive), 32, tmp_path / "p.arrow", progress=False)


@pytest.mark.parametrize("payload", [b"not a pickle", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
                                     pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})])
def test_cifar10_member_not_a_batch(tmp_path, cifar_source, payload):
    members = {**cifar_source[2], "cifar-10-batches-py/data_batch_2": payload}
    archive = write_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DataError, match=f"^cifar10: {archive}:cifar-10-batches-py/data_batch_2 is not a CIFAR-10 batch"):
        prepare_dataset("cifar10", str(archive), 32, tmp_path / "p.arrow", progress=False)


class RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_cifar10_pickle_may_not_run_code(tmp_path, cifar_source, capfd):
    members = {**cifar_source[2], "cifar-10-batches-py/data_batch_1": pickle.dumps({b"data": RunsCode()}, protocol=2)}
    archive = write_tar(tmp_path / "hostile.tar.gz", members)
    with pytest.raises(DataError, match=r"data_batch_1 is not a CIFAR-10 batch: .*refusing to load global .*system"):
        prepare_dataset("cifar10", str(archive), 32, tmp_path / "p.arrow", progress=False)
    assert "must never run" not in capfd.readouterr().out


def test_folder_without_images(tmp_path, memfs):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=f"^folder: no images .* under {empty}"):
        prepare_dataset("folder", str(empty), 16, tmp_path / "p.arrow", progress=False)
    fs, root = memfs
    fs.pipe(f"{root}/a.txt", b"x")
    with pytest.raises(DataError, match="^folder: no images .* under memory://"):
        prepare_dataset("folder", f"memory://{root}", 16, tmp_path / "p.arrow", progress=False)
    with pytest.raises(DataError, match="^folder: .*a.txt is not a directory"):
        prepare_dataset("folder", f"memory://{root}/a.txt", 16, tmp_path / "p.arrow", progress=False)


def test_folder_corrupt_image_named(tmp_path, folder_files):
    root = write_files(tmp_path / "images", folder_files[0])
    (root / "dog" / "broken.png").write_bytes(folder_files[0]["dog/a.png"][:60])
    with pytest.raises(DataError, match=f"^folder: cannot decode image {root}/dog/broken.png"):
        prepare_dataset("folder", str(root), 12, tmp_path / "p.arrow", progress=False)
    assert not (tmp_path / "p.arrow").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, digits16):
    out = tmp_path / "p.arrow"
    out.write_bytes(digits16[1].read_bytes())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pa.ipc, "new_file", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset("digits", None, 8, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.arrow"]
    assert PreparedDataset(out).info == digits16[0]  # the previous file is intact


def test_prepared_dataset_rejects_bad_files(tmp_path, digits16):
    with pytest.raises(DataError, match=f"^{tmp_path}/absent.arrow: no prepared dataset there"):
        PreparedDataset(tmp_path / "absent.arrow")
    data = digits16[1].read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 3):
        truncated = tmp_path / f"truncated{cut}.arrow"
        truncated.write_bytes(data[:cut])
        with pytest.raises(DataError, match=f"^{truncated}: not a prepared dataset .*truncated"):
            PreparedDataset(truncated)
    other = tmp_path / "other.arrow"
    with pa.ipc.new_file(str(other), pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], names=["x"]))
    with pytest.raises(DataError, match=f"^{other}: not a prepared dataset: metadata lacks channels"):
        PreparedDataset(other)
