"""Every file the project loads, given a crafted pickle whose unpickling runs `touch marker`: refused
naming the file, and the marker never appears (docs/reliability.md, "Damaged or crafted files").
The dataset sources' pickles (CIFAR-10, downsampled ImageNet) are tried in test_data.py and
test_imagenet64.py, the checkpoint resume path in test_checkpoint.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dddm import checkpoint
from dddm.classifier import load_classifier
from dddm.integrity import file_sha256, load_samples
from dddm.scoring import FeatureStats
from dddm.scoring.inception import load_inception
from dddm.scoring.reference import reference_files


class _Payload:
    """Unpickling this runs a shell command that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_save(path: Path, payload) -> None:
    with open(path, "wb") as f:
        torch.save(payload, f)


def _raw_pickle(path: Path, payload) -> None:
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def _npy_object_array(path: Path, payload) -> None:
    """A .npy (or, by name, an .npz of it) holding an object array: numpy pickles it."""
    array = np.empty(1, dtype=object)
    array[0] = payload
    if path.suffix == ".npz":
        np.savez(path, images=array, mu=array, sigma=array, n=array, images_sha256=array)
    else:
        with open(path, "wb") as f:
            np.save(f, array, allow_pickle=True)


def _reference_features(path: Path):
    """The reference features file, listed in a meta whose checksums match it (an attacker can rewrite both)."""
    stats = FeatureStats(mu=np.zeros(2), sigma=np.eye(2), n=3)
    stats.save(path.parent / "stats.npz")
    classifier = path.parent / "net.bin"
    classifier.write_bytes(b"x")
    meta = {"networks": {"classifier": {"file": str(classifier), "sha256": file_sha256(classifier),
                                        "stats": "stats.npz", "features": path.name,
                                        "stats_sha256": file_sha256(path.parent / "stats.npz"),
                                        "features_sha256": file_sha256(path)}}}
    return reference_files(path.parent, meta, "classifier", classifier)


LOADERS = {
    "model.pt": ("model.pt", lambda p: checkpoint.load_model(p)),
    "checkpoint file": ("train_state.pt", lambda p: checkpoint.load_file(p, "training state")),
    "classifier": ("classifier.pt", load_classifier),
    "inception weights": ("weights-inception-2015-12-05-6726825d.pth", load_inception),
    "reference statistics": ("classifier_stats.npz", FeatureStats.load),
    "reference features": ("classifier_features.npy", _reference_features),
    "samples": ("1-step.npz", lambda p: load_samples(p, "rerun the sample stage")),
}
WRITERS = {"torch.save": _torch_save, "raw pickle": _raw_pickle, "numpy object array": _npy_object_array}


# a raw pickle at Python's default protocol makes torch's weights-only unpickler warn before it refuses
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_a_crafted_pickle_without_running_it(tmp_path, loader, writer):
    name, load = LOADERS[loader]
    marker = tmp_path / "marker"
    path = tmp_path / name
    WRITERS[writer](path, {"state_dict": {"w": _Payload(marker)}, "images": _Payload(marker)})
    with pytest.raises((ValueError, RuntimeError)) as refused:
        load(path)
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_the_crafted_inception_weights_would_run_through_torch_fidelitys_own_loader(tmp_path):
    """What the test above guards against: torch-fidelity given the file's path unpickles it with
    weights_only=False and runs the payload (why load_inception reads the file itself)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    marker = tmp_path / "marker"
    path = tmp_path / "weights.pth"
    _torch_save(path, {"w": _Payload(marker)})
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises after running the payload
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    assert marker.exists()
