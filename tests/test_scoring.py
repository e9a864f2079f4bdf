"""Scoring: Frechet distance, parity with torch-fidelity, the classifier fallback, bad input.

The real FID Inception weights are not on this machine (no internet). Parity with torch-fidelity
is checked with a randomly initialised inception-v3-compat (fixed seed) saved to a file that
both sides load. FID / KID use the network's 64-d feature layer in place of pool3: a meaningful
Frechet distance needs N >= D + 1 images (else the covariance is singular), and 2049 images
through the full network at 299x299 take minutes on a CPU, while 2 x ~70 images through its
first blocks take seconds. The statistics and the distance code do not depend on the layer. IS
is checked on the real logits layer, with 16 images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
import torchvision.transforms.functional as TF
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from dddm import scoring as S
from dddm.pixels import to_float, to_uint8
from dddm.classifier import SmallClassifier, load_classifier, save_classifier, split_indices, train_classifier
from random_inception import save_random_inception_weights

SEED = 0


# ------------------------------------------------------------------------------------------
# Frechet distance and statistics


def _gaussian(n, d, rng, shift=0.0, scale=1.0):
    return rng.normal(shift, scale, size=(n, d))


def test_frechet_distance_self_shift_and_closed_form():
    rng = np.random.default_rng(0)
    a = S.FeatureStats.from_features(_gaussian(500, 16, rng))
    assert abs(a.frechet_distance(a)) < 1e-8
    x = _gaussian(500, 16, rng)
    dists = [S.FeatureStats.from_features(x).frechet_distance(S.FeatureStats.from_features(x + s))
             for s in (0.0, 0.1, 0.5, 1.0, 2.0)]
    assert abs(dists[0]) < 1e-8
    assert all(b > a for a, b in zip(dists, dists[1:]))
    # a shift by s in every coordinate moves only the mean term: 16 s^2
    assert dists[-1] == pytest.approx(16 * 4.0, rel=1e-6)

    # diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert S.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)

    with pytest.raises(ValueError, match="sigma1, sigma2"):
        S.frechet_distance(mu1, np.eye(3), mu2, np.eye(8))


def test_frechet_distance_singular_covariance_uses_offset():
    sigma = np.diag([1.0, 0.0, 2.0])  # singular, as with constant features
    assert S.frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma) == pytest.approx(0.0, abs=1e-5)


def test_feature_stats_save_load_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    st = S.FeatureStats.from_features(_gaussian(50, 4, rng))
    path = st.save(tmp_path / "ref" / "stats.npz")
    back = S.FeatureStats.load(path)
    assert back.n == 50 and np.array_equal(back.mu, st.mu) and np.array_equal(back.sigma, st.sigma)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        S.FeatureStats.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz"):
        S.FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="singular below 5 samples"):
        S.FeatureStats.from_features(_gaussian(4, 4, rng), name="feats")


# ------------------------------------------------------------------------------------------
# Parity with torch-fidelity (random-init Inception, shared weights file)


class _Images(Dataset):
    def __init__(self, x):
        self.x = torch.as_tensor(x)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("incep") / "random-inception.pth", seed=SEED)


def test_inception_score_matches_torch_fidelity(random_inception):
    # IS needs the full network (logits): few images keep it to seconds on a CPU
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (16, 3, 16, 16), dtype=np.uint8)
    extractor = S.load_inception(random_inception, [S.INCEPTION_ISC_LAYER], "cpu")
    ours = S.inception_metrics(x, None, None, extractor, fid_layer=None, isc_splits=2, batch_size=16, progress=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(x), isc=True, isc_splits=2, feature_extractor_weights_path=str(random_inception),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=16)
    assert ours["is"] > 1.0
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-9)


def test_to_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(u)), u)
    assert torch.equal(to_uint8(torch.tensor([-1.0, -1.5, 0.0, 1.0, 2.0])),
                       torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))


# ------------------------------------------------------------------------------------------
# Where the Inception weights are looked for


def test_inception_weights_missing_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert S.find_inception_weights(None) is None
    configured = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(S.InceptionWeightsMissing) as err:
        S.require_inception_weights(str(configured))
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert S.INCEPTION_WEIGHTS_FILENAME in msg and S.INCEPTION_WEIGHTS_URL in msg
    assert str(configured) in msg
    hub = tmp_path / "torch_home" / "hub" / "checkpoints" / S.INCEPTION_WEIGHTS_FILENAME
    assert str(hub) in msg
    assert all(str(p) in msg for p in S.inception_search_locations())
    with pytest.raises(S.InceptionWeightsMissing, match="memory://no/such/file.pth"):
        S.require_inception_weights("memory://no/such/file.pth")


def test_inception_weights_found_in_path_dir_url_and_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    f = tmp_path / "mine.pth"
    f.write_bytes(b"weights")
    assert S.find_inception_weights(str(f)) == f
    d = tmp_path / "dir"
    d.mkdir()
    (d / S.INCEPTION_WEIGHTS_FILENAME).write_bytes(b"weights")
    assert S.find_inception_weights(d) == d / S.INCEPTION_WEIGHTS_FILENAME
    # an fsspec URL is copied to a local cache file
    with fsspec.open("memory://bucket/" + S.INCEPTION_WEIGHTS_FILENAME, "wb") as out:
        out.write(b"remote weights")
    got = S.find_inception_weights("memory://bucket/" + S.INCEPTION_WEIGHTS_FILENAME, cache_dir=tmp_path / "c")
    assert got == tmp_path / "c" / S.INCEPTION_WEIGHTS_FILENAME and got.read_bytes() == b"remote weights"
    # the library's cache: $TORCH_HOME/hub/checkpoints
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / S.INCEPTION_WEIGHTS_FILENAME).write_bytes(b"weights")
    assert S.find_inception_weights(None) == hub / S.INCEPTION_WEIGHTS_FILENAME


# ------------------------------------------------------------------------------------------
# The classifier fallback on sklearn digits


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (F.interpolate(x, size=16, mode="bilinear", align_corners=False) * 2 - 1).clamp(-1, 1)
    return x.numpy(), d.target.astype(np.int64)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    x, y = digits
    model, acc = train_classifier(x, y, 10, epochs=8, batch_size=64, seed=SEED, progress=False)
    path = save_classifier(model, tmp_path_factory.mktemp("cls") / "classifier.pt", {"test_accuracy": acc})
    train_idx, hold_idx = split_indices(len(x), 0.2, SEED)
    return model, acc, path, x[train_idx], x[hold_idx], y[hold_idx]


def test_classifier_accuracy_and_save_load(trained):
    model, acc, path, _, held, _ = trained
    assert acc > 0.95
    back = load_classifier(path)
    assert back.meta["test_accuracy"] == acc and back.config == model.config
    with torch.no_grad():
        x = torch.as_tensor(held[:8])
        assert torch.equal(back.features(x), model.features(x))
        assert back.features(x).shape == (8, 128)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_classifier(path.parent / "nope.pt")


def test_classifier_training_is_deterministic(digits):
    x, y = digits
    x, y = x[:300], y[:300]
    m1, a1 = train_classifier(x, y, 10, epochs=1, seed=3, progress=False, width=8, feature_dim=16)
    m2, a2 = train_classifier(x, y, 10, epochs=1, seed=3, progress=False, width=8, feature_dim=16)
    assert a1 == a2
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x, y[:10], 10, epochs=1, progress=False)


def test_fallback_ranks_real_digits_far_better_than_noise_and_blur(trained):
    model, _, _, train_x, held, held_y = trained
    ref_feats = S.extract_features(train_x, model.features, progress=False)
    ref = S.FeatureStats.from_features(ref_feats)
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(0, 0.5, held.shape), -1, 1).astype(np.float32)
    blurred = TF.gaussian_blur(torch.as_tensor(held), kernel_size=5, sigma=1.5).numpy()
    collapsed = np.repeat(held[:1], len(held), axis=0)  # one digit, repeated
    one_class = held[held_y == 3]
    one_class = one_class[np.arange(len(held)) % len(one_class)]  # mode collapse onto a class

    def score(x):
        return S.classifier_metrics(x, ref, model, ref_feats, progress=False)

    real, m_noise, m_blur = score(held), score(noise), score(blurred)
    m_coll, m_class = score(collapsed), score(one_class)
    assert real["fid_classifier"] * 10 < m_blur["fid_classifier"]
    assert real["fid_classifier"] * 10 < m_noise["fid_classifier"]
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    assert real["is_classifier"] > 8.0  # at most 10 classes
    assert m_noise["precision"] < 0.2
    assert m_coll["recall"] < 0.05 and m_class["recall"] < 0.3
    assert m_coll["is_classifier"] < 1.1 and m_class["is_classifier"] < 1.5
    assert set(real) == {"fid_classifier", "is_classifier", "precision", "recall"}


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [100.0]])
    # k = 1: real radii [1, 1, 1, 1, 7]; fake radii [99.5, 99.5]
    p, r = S.precision_recall(real, fake, k=1)
    assert p == 0.5 and r == 1.0


# ------------------------------------------------------------------------------------------
# The score stage: reference directory, fallback selection, bad input


@pytest.fixture()
def no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))


@pytest.fixture()
def reference(trained, tmp_path, no_hub):
    _, _, path, train_x, _, _ = trained
    ref_dir = tmp_path / "reference"
    meta = S.compute_reference_stats(train_x, ref_dir, classifier_path=path, progress=False, fingerprint="abc")
    return ref_dir, meta


def test_score_samples_falls_back_to_the_classifier_under_its_own_names(trained, reference):
    _, acc, path, _, held, _ = trained
    ref_dir, meta = reference
    assert meta["networks"].keys() == {S.CLASSIFIER_NAME} and meta["image_shape"] == [1, 16, 16]
    assert json.loads((ref_dir / S.META_FILE).read_text())["fingerprint"] == "abc"
    held_u8 = to_uint8(torch.as_tensor(held)).numpy()
    out = S.score_samples(held_u8, reference_dir=ref_dir, classifier_path=path, progress=False)
    assert out["feature_network"] == "classifier" and out["inception_weights"] is None
    assert not {"fid", "is", "kid"} & out.keys()
    assert out["num_samples"] == len(held) and out["num_reference"] == meta["num_images"]
    assert out["classifier_test_accuracy"] == acc
    assert out["fid_classifier"] >= 0 and math.isfinite(out["is_classifier"])
    with pytest.raises(S.InceptionWeightsMissing, match=S.INCEPTION_WEIGHTS_FILENAME):
        S.score_samples(held, reference_dir=ref_dir, classifier_path=path, use_inception=True, progress=False)
    with pytest.raises(S.InceptionWeightsMissing, match="no classifier_path"):
        S.score_samples(held, reference_dir=ref_dir, progress=False)


def test_ensure_reference_stats_reuses_then_recomputes(trained, reference):
    _, _, path, train_x, _, _ = trained
    ref_dir, _ = reference
    stats = ref_dir / S.CLASSIFIER_STATS
    before = stats.stat().st_mtime_ns
    S.ensure_reference_stats(train_x, ref_dir, classifier_path=path, fingerprint="abc", progress=False)
    assert stats.stat().st_mtime_ns == before
    meta = S.ensure_reference_stats(train_x, ref_dir, classifier_path=path, fingerprint="new", progress=False)
    assert meta["fingerprint"] == "new"


def test_score_samples_bad_input_names_the_argument_or_file(trained, reference, tmp_path):
    model, _, path, _, held, _ = trained
    ref_dir, _ = reference

    def score(x, **kw):
        kw = {"reference_dir": ref_dir, "classifier_path": path, "progress": False, **kw}
        return S.score_samples(x, **kw)

    with pytest.raises(ValueError, match=r"^samples: expected \(N, C, H, W\)"):
        score(held[:, 0])
    with pytest.raises(ValueError, match=r"^samples: images are \(1, 8, 8\) but the reference is \(1, 16, 16\)"):
        score(held[:, :, ::2, ::2])
    with pytest.raises(ValueError, match=r"^samples: float images must be in \[-1, 1\].*\[0, 255\]"):
        score((held + 1) * 127.5)
    bad = held.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="^samples: contains NaN"):
        score(bad)
    with pytest.raises(ValueError, match="^samples: expected uint8"):
        score(held.astype(np.int64))
    with pytest.raises(ValueError, match="^samples: at least 2"):
        score(held[:1])
    with pytest.raises(ValueError, match=r"^my_samples: 100 images are too few .* below 129 samples"):
        score(held[:100], samples_name="my_samples")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / S.META_FILE)):
        score(held, reference_dir=tmp_path / "nowhere")
    (ref_dir / S.CLASSIFIER_STATS).unlink()
    with pytest.raises(FileNotFoundError, match=S.CLASSIFIER_STATS):
        score(held)
    other = save_classifier(SmallClassifier(1, 16, 10), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: differs from the classifier file"):
        score(held, classifier_path=other)



def test_inception_branch_matches_torch_fidelity(random_inception, tmp_path, monkeypatch):
    """Parity, end to end: compute_reference_stats + score_samples vs torch_fidelity.calculate_metrics
    on the same images with the same (random) network. The network's 64-d layer stands in for pool3
    and the logits: a Frechet distance needs N >= D + 1 images, and 2049 images through the full
    network at 299x299 take minutes on a CPU, while 2 x ~70 through its first blocks take seconds.
    Nothing downstream depends on the layer; IS on the real logits layer is checked below."""
    monkeypatch.setattr(S.inception, "INCEPTION_FID_LAYER", "64")
    monkeypatch.setattr(S.inception, "INCEPTION_ISC_LAYER", "64")
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / S.INCEPTION_WEIGHTS_FILENAME).write_bytes(random_inception.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    rng = np.random.default_rng(0)
    n, n_ref = 66, 70  # > 64 + 1: the covariance of the 64-d features is full rank
    a = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)  # grayscale noise
    ramp = np.linspace(0, 1, 32)[None, None, :, None]
    b = np.clip(rng.normal(0, 40, (n_ref, 1, 32, 32)) + 200 * ramp + rng.uniform(0, 50, (n_ref, 1, 1, 1)),
                0, 255).astype(np.uint8)
    ref_dir = tmp_path / "ref"
    meta = S.compute_reference_stats(b, ref_dir, batch_size=35, progress=False)
    assert set(meta["networks"]) == {S.INCEPTION_NAME} and (ref_dir / S.INCEPTION_FEATURES).is_file()
    # the samples as the sampler writes them: float in [-1, 1]
    ours = S.score_samples(a.astype(np.float32) / 127.5 - 1.0, reference_dir=ref_dir, batch_size=33,
                           progress=False)
    assert ours["feature_network"] == S.INCEPTION_NAME
    assert ours["inception_weights"] == str(hub / S.INCEPTION_WEIGHTS_FILENAME)
    assert not {"fid_classifier", "precision"} & ours.keys()
    assert ours["kid_subset_size"] == n

    # torch-fidelity's own computation: uint8 RGB (grayscale repeated, as PIL's convert("RGB"))
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(np.repeat(a, 3, axis=1)), input2=_Images(np.repeat(b, 3, axis=1)),
        fid=True, kid=True, isc=True, feature_layer_fid="64", feature_layer_kid="64", feature_layer_isc="64",
        kid_subset_size=n, feature_extractor_weights_path=str(random_inception), cuda=False, cache=False,
        verbose=False, save_cpu_ram=True, batch_size=40)
    fid_ref = theirs["frechet_inception_distance"]
    assert fid_ref > 0
    assert abs(ours["fid"] - fid_ref) / fid_ref < 1e-4
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)

    # the reference against itself is ~0 in this space too
    stats = S.FeatureStats.load(ref_dir / S.INCEPTION_STATS)
    assert abs(stats.frechet_distance(stats)) < 1e-6 * fid_ref

    with pytest.raises(ValueError, match=r"^samples: 60 images are too few .*inception 64"):
        S.score_samples(a[:60], reference_dir=ref_dir, use_inception=True, progress=False)
    other = save_random_inception_weights(tmp_path / "other.pth", seed=1)
    with pytest.raises(ValueError, match="other.pth: differs from the inception-v3-compat file"):
        S.score_samples(a, reference_dir=ref_dir, inception_weights=other, progress=False)


def test_auto_falls_back_to_the_classifier_when_too_few_images_for_inception_fid(trained, random_inception,
                                                                                   tmp_path, caplog):
    """`use_inception: auto` with the weights present and the digits' 1797 images (< 2049): the
    reference and the score use the classifier, and the log says why; `always` still refuses."""
    _, _, path, train_x, held, _ = trained
    meta = S.compute_reference_stats(train_x, tmp_path / "ref", classifier_path=path,
                                     inception_weights=random_inception, progress=False)
    assert meta["networks"].keys() == {S.CLASSIFIER_NAME}
    assert f"{len(train_x)} images, fewer than the 2049 an Inception FID needs" in caplog.text
    out = S.score_samples(to_uint8(torch.as_tensor(held)).numpy(), reference_dir=tmp_path / "ref",
                          classifier_path=path, inception_weights=random_inception, progress=False)
    assert out["feature_network"] == S.CLASSIFIER_NAME and "fid" not in out
    with pytest.raises(ValueError, match="too few for a Frechet distance in the 2048-d inception"):
        S.compute_reference_stats(train_x, tmp_path / "ref2", classifier_path=path, use_inception=True,
                                  inception_weights=random_inception, progress=False)


def _flip(path: Path, count: int, at: float = 0.5) -> None:
    """Invert `count` bytes from the middle of `path` (or as many as fit)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_reference_files_and_classifier_stop_scoring_naming_the_file(trained, reference, tmp_path):
    """The issue's trials: 400,000 bytes flipped in the reference features (here all of a small file's
    middle), 16 in the classifier: each an error naming the file and what to rerun, never a score."""
    _, _, path, _, held, _ = trained
    ref_dir, _ = reference
    held_u8 = to_uint8(torch.as_tensor(held)).numpy()
    S.score_samples(held_u8, reference_dir=ref_dir, classifier_path=path, progress=False)
    for name in (S.CLASSIFIER_FEATURES, S.CLASSIFIER_STATS):
        kept = (ref_dir / name).read_bytes()
        _flip(ref_dir / name, 400_000, at=0.3)
        with pytest.raises(ValueError, match=f"^{ref_dir / name}: its sha256 differs .*dvc repro -f reference"):
            S.score_samples(held_u8, reference_dir=ref_dir, classifier_path=path, progress=False)
        (ref_dir / name).write_bytes(kept)
    damaged = tmp_path / "classifier.pt"
    damaged.write_bytes(path.read_bytes())
    _flip(damaged, 16, at=0.6)
    with pytest.raises(ValueError, match=f"^{damaged}: .*dvc repro -f classifier"):
        load_classifier(damaged)


def test_samples_are_written_batch_by_batch_and_a_damaged_file_is_named(tmp_path):
    from dddm.integrity import IntegrityError, load_samples, save_samples

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 3, 4, 4), dtype=np.uint8)
    path = tmp_path / "1-step.npz"
    save_samples((images[i:i + 4] for i in range(0, 10, 4)), 10, path)
    assert np.array_equal(np.load(path)["images"], images)  # as np.savez_compressed's files are read
    assert np.array_equal(load_samples(path, "rerun"), images)
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(IntegrityError, match=f"^{path}: not a readable samples file .*BadZipFile.*; rerun"):
        load_samples(path, "rerun")
    np.savez_compressed(path, images=images)  # foreign: no checksum
    with pytest.raises(IntegrityError, match=f"^{path}: not a samples file of the sample stage .*images_sha256"):
        load_samples(path, "rerun")
    save_samples([images], 10, path)
    with np.load(path) as z:
        digest = z["images_sha256"]
    one_changed = images ^ np.eye(1, images.size, 7, dtype=np.uint8).reshape(images.shape)
    np.savez(path, images=one_changed, images_sha256=digest)
    with pytest.raises(IntegrityError, match=f"^{path}: the images do not match the file's checksum"):
        load_samples(path, "rerun")
    with pytest.raises(ValueError, match="9 samples written, 10 expected"):
        save_samples([images[:9]], 10, tmp_path / "short.npz")
    assert not (tmp_path / "short.npz").exists()
