"""Reference statistics: the training set's features and their statistics per feature network,
computed once per prepared dataset into a directory (a DVC output), and read back checked
against the networks they were computed with (docs/scoring.md, "Reference statistics")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classifier import load_classifier
from ..files import atomic_open
from ..integrity import check_file_sha256, file_sha256
from . import inception
from .fallback import CLASSIFIER_NAME
from .features import default_device, extract_features, validate_images
from .frechet import FeatureStats, check_count
from .inception import (INCEPTION_NAME, InceptionWeightsMissing, inception_fn, load_inception, resolve_inception,
                        search_inception_weights)

META_FILE = "meta.json"
CLASSIFIER_STATS = "classifier_stats.npz"
CLASSIFIER_FEATURES = "classifier_features.npy"
INCEPTION_STATS = "inception_stats.npz"
INCEPTION_FEATURES = "inception_features.npy"
RECOMPUTE = "recompute the reference statistics (`dvc repro -f reference`, or `dvc checkout data/reference`)"


def _write_json(path: Path, obj: dict) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _written(out_dir: Path, stats: str, features: str) -> dict[str, str]:
    """The meta entries of a network's two files: their names and sha256, checked when they are read."""
    return {"stats": stats, "features": features, "stats_sha256": file_sha256(out_dir / stats),
            "features_sha256": file_sha256(out_dir / features)}


def load_reference_meta(reference_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(reference_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference statistics not found (compute them with "
                                "dddm.scoring.compute_reference_stats on the prepared dataset)")
    try:
        meta = json.loads(path.read_text())
        meta["image_shape"], meta["num_images"], meta["networks"]  # noqa: B018 - required keys
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a reference meta file ({e})") from e
    return meta


def compute_reference_stats(images: np.ndarray | torch.Tensor, reference_dir: str | os.PathLike, *,
                            classifier_path: str | os.PathLike | None = None,
                            inception_weights: str | os.PathLike | None = None,
                            use_inception: bool | None = None, batch_size: int = 256,
                            device: str | torch.device | None = None, progress: bool = True,
                            fingerprint: str | None = None) -> dict[str, Any]:
    """Features of the reference (training) images with every available feature network, written
    to `reference_dir` (layout in docs/scoring.md); returns the meta dict.

    Networks: the classifier if `classifier_path` is given; Inception if `use_inception` is True
    (raise if the weights are missing) or None (if `find_inception_weights(inception_weights)`
    finds them). `fingerprint` (of the prepared dataset) is recorded for `ensure_reference_stats`.
    """
    validate_images(images, name="images")
    weights = resolve_inception(inception_weights, use_inception, len(images), "the reference images")
    if classifier_path is None and weights is None:
        raise InceptionWeightsMissing(search_inception_weights(inception_weights, None)[1],
                                      "and no classifier_path was given for the offline fallback")
    classifier = load_classifier(classifier_path) if classifier_path is not None else None
    n, shape = len(images), list(images.shape[1:])
    if classifier is not None:
        cfg = classifier.config
        if [cfg["in_channels"], cfg["image_size"], cfg["image_size"]] != shape:
            raise ValueError(f"images: images are {tuple(shape)} but the classifier {classifier_path} takes "
                             f"({cfg['in_channels']}, {cfg['image_size']}, {cfg['image_size']})")
        check_count(n, classifier.feature_dim, name="images", network=CLASSIFIER_NAME)
    if weights is not None:
        check_count(n, int(inception.INCEPTION_FID_LAYER), name="images", network=f"inception {inception.INCEPTION_FID_LAYER}")
    dev = default_device(device)
    out_dir = Path(reference_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    networks: dict[str, Any] = {}
    if classifier is not None:
        feats = extract_features(images, classifier.to(dev).features, input_kind="float", batch_size=batch_size,
                                 device=dev, progress=progress, desc="reference classifier")
        FeatureStats.from_features(feats, name="images").save(out_dir / CLASSIFIER_STATS)
        with atomic_open(out_dir / CLASSIFIER_FEATURES) as f:
            np.save(f, feats)
        networks[CLASSIFIER_NAME] = {
            "file": str(classifier_path), "sha256": file_sha256(classifier_path),
            "feature_dim": classifier.feature_dim, "test_accuracy": classifier.meta.get("test_accuracy"),
            **_written(out_dir, CLASSIFIER_STATS, CLASSIFIER_FEATURES)}
    if weights is not None:
        model = load_inception(weights, [inception.INCEPTION_FID_LAYER], dev)
        feats = extract_features(images, inception_fn(model), input_kind="uint8", rgb=True,
                                 batch_size=batch_size, device=dev, progress=progress, desc="reference inception")[0]
        FeatureStats.from_features(feats, name="images").save(out_dir / INCEPTION_STATS)
        with atomic_open(out_dir / INCEPTION_FEATURES) as f:
            np.save(f, feats)
        networks[INCEPTION_NAME] = {
            "file": str(weights), "sha256": file_sha256(weights), "feature_dim": int(inception.INCEPTION_FID_LAYER),
            **_written(out_dir, INCEPTION_STATS, INCEPTION_FEATURES)}
    for name, files in ((CLASSIFIER_NAME, (CLASSIFIER_STATS, CLASSIFIER_FEATURES)),
                        (INCEPTION_NAME, (INCEPTION_STATS, INCEPTION_FEATURES))):
        if name not in networks:  # stale files of a network not computed this time
            for f in files:
                (out_dir / f).unlink(missing_ok=True)
    meta = {"image_shape": shape, "num_images": n, "fingerprint": fingerprint, "networks": networks}
    _write_json(out_dir / META_FILE, meta)
    return meta


def ensure_reference_stats(images: np.ndarray | torch.Tensor, reference_dir: str | os.PathLike, *,
                           classifier_path: str | os.PathLike | None = None,
                           inception_weights: str | os.PathLike | None = None,
                           use_inception: bool | None = None, fingerprint: str | None = None,
                           **kwargs: Any) -> dict[str, Any]:
    """`compute_reference_stats` unless `reference_dir` already holds statistics of these images
    (same shape, count and fingerprint) with the same networks (same file hashes)."""
    try:
        meta = load_reference_meta(reference_dir)
    except (FileNotFoundError, ValueError):
        meta = None
    if meta is not None:
        weights = resolve_inception(inception_weights, use_inception, len(images), "the reference images")
        nets = meta["networks"]
        want = {CLASSIFIER_NAME: classifier_path, INCEPTION_NAME: weights}
        current = (meta["image_shape"] == list(images.shape[1:]) and meta["num_images"] == len(images)
                   and meta.get("fingerprint") == fingerprint
                   and all((p is None) == (name not in nets) for name, p in want.items())
                   and all(nets[name]["sha256"] == file_sha256(p) for name, p in want.items() if p is not None)
                   and all((Path(reference_dir) / nets[name][key]).is_file()
                           for name in nets for key in ("stats", "features")))
        if current:
            return meta
    return compute_reference_stats(images, reference_dir, classifier_path=classifier_path,
                                   inception_weights=inception_weights, use_inception=use_inception,
                                   fingerprint=fingerprint, **kwargs)


def reference_files(reference_dir: Path, meta: dict, name: str, file: str | os.PathLike
                     ) -> tuple[FeatureStats, np.ndarray]:
    nets = meta["networks"]
    meta_path = reference_dir / META_FILE
    if name not in nets:
        expected = reference_dir / (INCEPTION_STATS if name == INCEPTION_NAME else CLASSIFIER_STATS)
        raise FileNotFoundError(f"{meta_path}: has no {name} reference statistics (expected {expected}); "
                                f"recompute them with {file}")
    info = nets[name]
    if info["sha256"] != file_sha256(file):
        raise ValueError(f"{file}: differs from the {name} file the reference statistics in {reference_dir} were "
                         f"computed with ({info['file']}); recompute them")
    feats_path = reference_dir / info["features"]
    for key in ("stats", "features"):
        if not (reference_dir / info[key]).is_file():
            raise FileNotFoundError(f"{reference_dir / info[key]}: reference {key} not found; {RECOMPUTE}")
        check_file_sha256(reference_dir / info[key], info.get(f"{key}_sha256"), meta_path, RECOMPUTE)
    stats = FeatureStats.load(reference_dir / info["stats"])
    try:
        feats = np.load(feats_path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a foreign or truncated file makes numpy raise nearly anything
        raise ValueError(f"{feats_path}: not a features file ({type(e).__name__}: {e}); {RECOMPUTE}") from None
    if not isinstance(feats, np.ndarray):  # a zip file is read as an npz archive
        raise ValueError(f"{feats_path}: not a .npy features file (an archive); {RECOMPUTE}")
    if feats.ndim != 2 or feats.shape[1] != stats.dim:
        raise ValueError(f"{feats_path}: expected (N, {stats.dim}) features, got {feats.shape}")
    return stats, feats
