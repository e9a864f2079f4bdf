"""The imagenet64 source on a small synthetic set written in the real downsampled-ImageNet format."""

import os
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
from PIL import Image

from dddm.data import DataError, PreparedDataset, fingerprint, prepare_dataset

PER_BATCH = 30  # 10 batches: 300 images of 3x64x64


def batch_dict(images: np.ndarray, labels: np.ndarray) -> dict:
    """As the release's pickles: str keys, data uint8 (N, 12288) CHW rows, labels a list of 1-based ints."""
    return {"data": images.reshape(len(images), -1), "labels": labels.tolist(),
            "mean": images.reshape(len(images), -1).mean(0)}


def write_batches(root: Path, images: np.ndarray, labels: np.ndarray, npz: bool = False, protocol: int = 2,
                  per_batch: int = PER_BATCH) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for b in range(10):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        name = root / f"train_data_batch_{b + 1}"
        if npz:
            np.savez(name.with_suffix(".npz"), data=images[rows].reshape(-1, 12288), labels=labels[rows],
                     mean=np.zeros(12288))
        else:
            name.write_bytes(pickle.dumps(batch_dict(images[rows], labels[rows]), protocol=protocol))
    (root / "val_data").write_bytes(b"the validation set is not read")
    return root


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10 * PER_BATCH, 3, 64, 64), dtype=np.uint8)
    labels = rng.integers(1, 1001, 10 * PER_BATCH)
    labels[:2] = 1, 1000  # both ends of the 1-based range
    return images, labels


@pytest.mark.parametrize("variant", ["pickle-2", "pickle-5", "npz", "memory-url"])
def test_pixels_exact_and_labels_zero_based(tmp_path, source, variant):
    images, labels = source
    if variant == "memory-url":
        local = write_batches(tmp_path / "src", images, labels)
        fs = fsspec.filesystem("memory")
        for file in local.iterdir():
            fs.pipe(f"/imagenet64-test/{file.name}", file.read_bytes())
        path = "memory://imagenet64-test"
    else:
        kind, _, protocol = variant.partition("-")
        path = str(write_batches(tmp_path / "src", images, labels, npz=kind == "npz", protocol=int(protocol or 2)))
    info = prepare_dataset("imagenet64", path, 64, tmp_path / "p.arrow", progress=False)
    assert (info.num_samples, info.channels, info.image_size, info.num_classes) == (300, 3, 64, 1000)
    assert info.fingerprint == fingerprint(images, labels - 1)  # the in-memory definition, unchanged
    ds = PreparedDataset(tmp_path / "p.arrow")
    assert np.array_equal(ds._images, images) and np.array_equal(ds._labels, labels - 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the raw file is gone


def test_resized_like_the_other_sources(tmp_path, source):
    images, labels = source
    path = write_batches(tmp_path / "src", images, labels)
    info = prepare_dataset("imagenet64", str(path), 32, tmp_path / "p.arrow", progress=False)
    first = Image.fromarray(images[0].transpose(1, 2, 0)).resize((32, 32), Image.Resampling.BILINEAR)
    assert info.image_size == 32
    assert np.array_equal(PreparedDataset(tmp_path / "p.arrow")._images[0], np.asarray(first).transpose(2, 0, 1))


def test_streamed_one_batch_at_a_time(tmp_path):
    """Python-heap peak while preparing stays at a few source batches (unpickling holds the bytes read
    and the array made of them), well below the dataset's 10 batches."""
    per_batch = 200
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10 * per_batch, 3, 64, 64), dtype=np.uint8)
    path = write_batches(tmp_path / "src", images, rng.integers(1, 1001, 10 * per_batch), protocol=4,
                         per_batch=per_batch)
    del images
    tracemalloc.start()
    try:
        prepare_dataset("imagenet64", str(path), 64, tmp_path / "p.arrow", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dataset_bytes, batch_bytes = 10 * per_batch * 12288, per_batch * 12288
    assert peak < 4 * batch_bytes < dataset_bytes / 2, (peak, batch_bytes)


class RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_errors_name_the_file(tmp_path, source, capfd):
    images, labels = source
    good = write_batches(tmp_path / "good", images, labels)
    out = tmp_path / "p.arrow"

    def fails_with(pattern: str, root: Path) -> None:
        with pytest.raises(DataError, match=pattern):
            prepare_dataset("imagenet64", str(root), 64, out, progress=False)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".p.arrow")]

    def variant(name: str, batch: str, payload: bytes | None) -> Path:
        root = tmp_path / name
        root.mkdir()
        for file in good.iterdir():
            if file.name != batch:
                (root / file.name).write_bytes(file.read_bytes())
        if payload is not None:
            (root / batch).write_bytes(payload)
        return root

    full = (good / "train_data_batch_4").read_bytes()
    fails_with(r"^imagenet64: .*missing lacks train_data_batch_7 \(nor their .npz", variant("missing", "train_data_batch_7", None))
    fails_with(r"^imagenet64: .*truncated/train_data_batch_4 is not a downsampled-ImageNet batch",
               variant("truncated", "train_data_batch_4", full[: len(full) // 2]))
    shape = pickle.dumps({"data": np.zeros((5, 3072), np.uint8), "labels": [1] * 5})
    fails_with(r"^imagenet64: .*shape/train_data_batch_2 has data uint8 \(5, 3072\).*expected uint8 \(N, 12288\)",
               variant("shape", "train_data_batch_2", shape))
    zero = pickle.dumps({"data": np.zeros((5, 12288), np.uint8), "labels": [0, 1, 2, 3, 4]})
    fails_with(r"^imagenet64: .*zero/train_data_batch_3 has labels in 0..4; the format's are 1..1000",
               variant("zero", "train_data_batch_3", zero))
    fails_with(r"^imagenet64: .*hostile/train_data_batch_1 is not .*refusing to load global .*system",
               variant("hostile", "train_data_batch_1", pickle.dumps({"data": RunsCode()}, protocol=2)))
    assert "must never run" not in capfd.readouterr().out
    npz = tmp_path / "npz"
    write_batches(npz, images, labels, npz=True)
    with zipfile.ZipFile(npz / "train_data_batch_5.npz", "w") as z:  # a member with a pickled object array
        z.writestr("data.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
                   + b" " * 42 + b"\n" + pickle.dumps(np.zeros(1, object)))
    fails_with(r"^imagenet64: .*npz/train_data_batch_5.npz is not a downsampled-ImageNet batch", npz)
    fails_with(r"^imagenet64: .*train_data_batch_1 is a file; data.source imagenet64 reads a directory",
               good / "train_data_batch_1")


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_presets_valid_at_64_with_the_papers_training_setting(kind):
    from conftest import ROOT, repo_params
    from dddm.config import merge_params, parse_config

    overrides = yaml.safe_load((ROOT / "presets" / f"imagenet64-{kind}.yaml").read_text())
    cfg = parse_config(merge_params(repo_params(), merge_params(overrides, {"data": {"path": "/data/imagenet64"}})))
    assert (cfg.data.source, cfg.data.image_size, cfg.methods, cfg.make_method("udddm").process.name) == \
        ("imagenet64", 64, ("udddm",), kind)
    assert cfg.train.batch_size * cfg.train.nproc == 1024 and cfg.train.lr == 2e-4 and cfg.train.ema_decay == 0.9999
    assert round(400_000 * 1024 / 1_281_167) == cfg.train.epochs
    store = cfg.method.udddm.store
    assert (store.policy, store.dtype) == ("auto", "float16")
