"""Scoring samples: FID, IS and KID as the field computes them, and an honestly named fallback.

Library choice: torch-fidelity, used directly
--------------------------------------------
torch-fidelity is the reference-matching PyTorch implementation: its `inception-v3-compat`
network is the TF 2015-12-05 FID Inception graph converted to PyTorch, with the TF1 bilinear
resize to 299x299, and its FID / IS / KID reproduce the TTUR / improved-GAN / MMD-GAN code to
high precision. torchmetrics does not replace it, it wraps it: `FrechetInceptionDistance`'s
`NoTrainInceptionV3` subclasses torch-fidelity's `FeatureExtractorInceptionV3` (same weights
file), but re-implements the statistics (a one-pass covariance sum x x^T - n mu mu^T in
float64, `torch.linalg.eigvals` for the trace term, the result cast back to float32) and has
its own IS and KID. So torchmetrics adds a second implementation of the statistics on top of
the same network, and a dependency, for no gain here (no distributed `update()` is needed: the
score stage sees every sample). Using torch-fidelity directly gives: the reference network;
its own IS (`isc_features_to_metric`: logits without the fc bias, 10 splits) and KID
(`kid_features_to_metric`: cubic polynomial kernel, 100 subsets of 1000) called unchanged on
our features; and its command-line tool `fidelity` as an independent check
(`tests/test_scoring.py` checks parity, `bench/bench_scoring.py` compares speed).

FID here is `frechet_distance`: the TTUR / pytorch-fid formula with `scipy.linalg.sqrtm` on
float64 statistics (mean, unbiased covariance of the features). torch-fidelity computes the
same trace term through the eigenvalues of sigma1 sigma2; the test checks both agree to 1e-4
relative on the same images and network.

Images: (N, C, H, W), C = 1 or 3, either uint8 in [0, 255] or float in [-1, 1] (what the
sampler writes). Floats become uint8 as EDM writes its PNGs, floor(127.5 x + 128) clipped to
[0, 255] (uint8 -> float is u / 127.5 - 1, so the round trip is exact); grayscale is repeated
to 3 channels for Inception, as PIL's convert("RGB") does for the files the field scores.

Inception weights
-----------------
torch-fidelity downloads `weights-inception-2015-12-05-6726825d.pth` from
`INCEPTION_WEIGHTS_URL` into the torch hub cache, `torch.hub.get_dir()/checkpoints/` (i.e.
`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`; torchmetrics uses
the same file and place). Nothing here downloads: `find_inception_weights(configured)` looks
in the configured path (a file, a directory holding that file, or an fsspec URL which is
copied into the hub cache) and then in the hub cache; `InceptionWeightsMissing` lists every
place it looked, the file name and where to get it.

The offline fallback, and why it is not FID
-------------------------------------------
Without those weights there is no FID: a Frechet distance is only comparable to the papers'
numbers in the same feature space. The fallback measures samples in the feature space of a
small classifier trained on the prepared dataset's labels (`dddm.classifier`, trained in the
prepare stage, its held-out accuracy kept in its meta):
- `fid_classifier`: Frechet distance between Gaussians fitted to its 128-d penultimate
  features of the samples and of the training set;
- `is_classifier`: exp(E_x KL(p(y|x) || p(y))) with the classifier's softmax, one split over
  all samples (at most the number of classes; 10 for digits);
- `precision`, `recall`: improved precision and recall (Kynkaenniemi et al. 2019) with k = 3
  nearest-neighbour radii in the same feature space. Precision: the fraction of samples inside
  the real manifold (the union of balls around reference features, each of radius the distance
  to its 3rd nearest reference neighbour); recall: the fraction of reference images inside the
  manifold of the samples. The reference is subsampled (fixed seed) to as many images as there
  are samples, so both manifolds are estimated at the same density, as in the paper. A
  mode-collapsed model keeps a good precision but loses recall.
These names never appear as `fid` / `is`; the numbers are useful to compare runs of this
project with each other, not with the papers. When a classifier is given the fallback
metrics are reported too when the Inception weights are present.

Sample counts
-------------
A Frechet distance needs the covariance of D-dimensional features, which is singular below
D + 1 samples (rank <= N - 1): the square root is then ill-conditioned and the number
meaningless. So scoring raises (naming the argument) when N < D + 1: 2049 samples for FID
(50k for paper comparisons; FID is biased upwards at small N), 129 for the classifier. KID
is unbiased at any N; its subset size is min(kid_subset_size, N, N_reference) and reported.
With use_inception None (`auto`), fewer than 2049 reference images or samples make scoring fall
back to the classifier alone, with a warning saying why, instead of raising.

Memory stays bounded: images go through the networks batch by batch (only the features,
N x D float32, are kept: 400 MB for 50k x 2048), and the k-NN distances are computed in
blocks of at most ~64 MB.

Reference statistics (`compute_reference_stats` / `ensure_reference_stats`) are computed once
per prepared dataset into a directory, meant to be a DVC output:
  meta.json                  image shape, count, fingerprint, networks and their file hashes
  classifier_stats.npz       mu, sigma, n of the classifier features    (FeatureStats)
  classifier_features.npy    the classifier features (for precision / recall)
  inception_stats.npz        mu, sigma, n of the 2048-d pool3 features  (FeatureStats)
  inception_features.npy     the pool3 features (for KID)
`score_samples` then scores each sample set against it, checking first that the samples
match the reference and that the networks are the ones the reference was computed with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from .classifier import SmallClassifier, file_sha256, load_classifier

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_FID_LAYER = "2048"
INCEPTION_ISC_LAYER = "logits_unbiased"  # torch-fidelity's default for IS: the fc layer without its bias
CLASSIFIER_NAME = "classifier"

META_FILE = "meta.json"
CLASSIFIER_STATS = "classifier_stats.npz"
CLASSIFIER_FEATURES = "classifier_features.npy"
INCEPTION_STATS = "inception_stats.npz"
INCEPTION_FEATURES = "inception_features.npy"

_FLOAT_TOL = 1e-3  # float images may exceed [-1, 1] by this much (rounding); beyond it is an error
_BLOCK_BYTES = 64 << 20  # the largest distance block of the k-NN computations


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights are not where they were looked for; the message lists where."""

    def __init__(self, searched: Sequence[str], note: str = ""):
        self.searched = list(searched)
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        lines = [
            f"Inception weights for FID/IS/KID not found: expected the file {INCEPTION_WEIGHTS_FILENAME!r} "
            "(torch-fidelity's inception-v3-compat, the TF 2015-12-05 FID Inception converted to PyTorch). "
            "Looked in:",
            *(f"  - {s}" for s in self.searched),
            f"Get it on a machine with internet from {INCEPTION_WEIGHTS_URL} and put it in {hub}/ "
            "(or set $TORCH_HOME), or give its path (a local path or an fsspec URL) as the inception "
            "weights setting in params.yaml.",
        ]
        if note:
            lines.append(note)
        self.message = "\n".join(lines)
        self.expected_file = INCEPTION_WEIGHTS_FILENAME
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# Frechet distance and feature statistics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    As pytorch-fid / TTUR: if the product is singular (non-finite square root), eps is added
    to both diagonals; a complex square root is accepted only when the imaginary part of its
    diagonal is numerical noise (atol 1e-3), and its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1, mu2: expected two vectors of the same length, got {mu1.shape}, {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1, sigma2: expected ({d}, {d}), got {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"frechet_distance: the square root of sigma1 sigma2 has an imaginary component {m}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@dataclass(frozen=True)
class FeatureStats:
    """Mean and unbiased covariance (float64) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray, *, name: str = "features") -> FeatureStats:
        """Statistics of (N, D) features; N >= D + 1 so the covariance is not singular."""
        f = np.asarray(features)
        if f.ndim != 2:
            raise ValueError(f"{name}: expected (N, D) features, got shape {f.shape}")
        n, d = f.shape
        check_count(n, d, name=name)
        f = f.astype(np.float64)
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=n)

    def frechet_distance(self, other: FeatureStats) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> Path:
        """Write mu, sigma, n to `path` (.npz), atomically."""
        path = Path(path)

        def write(f):
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))

        _atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: reference statistics not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma, n = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), int(z["n"])
        except Exception as e:  # noqa: BLE001 - any failure to read means a bad file
            raise ValueError(f"{path}: not a feature statistics file with mu, sigma, n ({e})") from e
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or n < 2:
            raise ValueError(f"{path}: inconsistent statistics (mu {mu.shape}, sigma {sigma.shape}, n {n})")
        return cls(mu=mu, sigma=sigma, n=n)


def check_count(n: int, dim: int, *, name: str = "samples", network: str = "") -> None:
    """Raise unless n >= dim + 1: below that the covariance of dim-d features is singular."""
    if n < 2:
        raise ValueError(f"{name}: at least 2 images are needed, got {n}")
    if n < dim + 1:
        where = f" in the {dim}-d {network} feature space" if network else f" of {dim}-d features"
        raise ValueError(
            f"{name}: {n} images are too few for a Frechet distance{where}: the covariance is singular "
            f"below {dim + 1} samples (rank <= N - 1); use at least {dim + 1} (50000 for paper comparisons)")


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# Images: validation, conversion, batched feature extraction


def validate_images(images: Any, *, name: str = "samples",
                    expected_shape: Sequence[int] | None = None, batch_size: int = 4096) -> None:
    """Raise ValueError (naming `name`) unless `images` is (N, C, H, W), N >= 2, C in (1, 3),
    H = W >= 8 (and (C, H, W) == expected_shape if given), uint8, or float finite in [-1, 1]."""
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name}: expected a numpy array or tensor, got {type(images).__name__}")
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: expected (N, C, H, W) images, got shape {shape}")
    n, c, h, w = shape
    if c not in (1, 3) or h != w or h < 8:
        raise ValueError(f"{name}: expected (N, C, H, H) with C in (1, 3) and H >= 8, got shape {shape}")
    if expected_shape is not None and (c, h, w) != tuple(expected_shape):
        raise ValueError(f"{name}: images are {(c, h, w)} but the reference is {tuple(expected_shape)}")
    if n < 2:
        raise ValueError(f"{name}: at least 2 images are needed, got {n}")
    dtype = images.dtype
    is_uint8 = dtype in (np.uint8, torch.uint8)
    is_float = (torch.is_floating_point(images) if isinstance(images, torch.Tensor)
                else np.issubdtype(dtype, np.floating))
    if is_uint8:
        return
    if not is_float:
        raise ValueError(f"{name}: expected uint8 in [0, 255] or float in [-1, 1], got dtype {dtype}")
    lo, hi = math.inf, -math.inf
    for i in range(0, n, batch_size):
        chunk = torch.as_tensor(np.asarray(images[i:i + batch_size]) if isinstance(images, np.ndarray)
                                else images[i:i + batch_size])
        if not torch.isfinite(chunk).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
        lo, hi = min(lo, chunk.min().item()), max(hi, chunk.max().item())
    if lo < -1 - _FLOAT_TOL or hi > 1 + _FLOAT_TOL:
        hint = " (looks like [0, 255]: pass uint8)" if hi > 2 else (" (looks like [0, 1])" if lo >= 0 else "")
        raise ValueError(f"{name}: float images must be in [-1, 1], got [{lo:.4g}, {hi:.4g}]{hint}")


def to_uint8(batch: torch.Tensor) -> torch.Tensor:
    """uint8 passes through; float [-1, 1] -> floor(127.5 x + 128) clipped to [0, 255] (EDM's PNGs)."""
    if batch.dtype == torch.uint8:
        return batch
    return torch.floor(batch.to(torch.float32) * 127.5 + 128.0).clamp_(0, 255).to(torch.uint8)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 -> u / 127.5 - 1 (float32); float passes through as float32."""
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32) / 127.5 - 1.0
    return batch.to(torch.float32)


def extract_features(images: np.ndarray | torch.Tensor,
                     features: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], *,
                     input_kind: str = "float", rgb: bool = False, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = True,
                     desc: str = "features") -> np.ndarray | tuple[np.ndarray, ...]:
    """Run `features` over `images` batch by batch; returns (N, D) float32 (a tuple if `features`
    returns a tuple). Each batch is converted to `input_kind` ("uint8": [0, 255], "float":
    [-1, 1]), repeated to 3 channels if `rgb`, moved to `device`; only the features are kept."""
    if input_kind not in ("uint8", "float"):
        raise ValueError(f"input_kind: expected 'uint8' or 'float', got {input_kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(images)
    convert = to_uint8 if input_kind == "uint8" else to_float
    outs: list[np.ndarray] | None = None
    single = False
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="img", disable=not progress,
                                      file=sys.stderr) as bar:
        for i in range(0, n, batch_size):
            chunk = images[i:i + batch_size]
            batch = convert(torch.as_tensor(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray)
                                            else chunk))
            if rgb and batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            out = features(batch.to(device))
            if isinstance(out, torch.Tensor):
                single, out = True, (out,)
            if outs is None:
                outs = [np.empty((n, *o.shape[1:]), np.float32) for o in out]
            for dst, o in zip(outs, out):
                dst[i:i + len(o)] = o.detach().to("cpu", torch.float32).reshape(len(o), *dst.shape[1:]).numpy()
            bar.update(len(batch))
    assert outs is not None
    return outs[0] if single else tuple(outs)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# Inception (torch-fidelity)


def inception_search_locations() -> list[Path]:
    """The library's usual places for the weights file: the torch hub cache (where torch-fidelity's
    `load_state_dict_from_url` and torchmetrics put it), and the default one if $TORCH_HOME moved it."""
    places = [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME]
    default = Path(os.path.expanduser("~/.cache/torch/hub/checkpoints")) / INCEPTION_WEIGHTS_FILENAME
    if default not in places:
        places.append(default)
    return places


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _fetch_url(url: str, cache_dir: Path) -> Path:
    """Copy an fsspec URL to cache_dir/<basename> (reused when its size matches); returns the path."""
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url)
    info = fs.info(remote)  # FileNotFoundError if absent
    if info.get("type") == "directory":
        remote = remote.rstrip("/") + "/" + INCEPTION_WEIGHTS_FILENAME
        info = fs.info(remote)
    local = cache_dir / Path(remote).name
    size = info.get("size")
    if local.is_file() and size is not None and local.stat().st_size == size:
        return local

    def write(f):
        with fs.open(remote, "rb") as src:
            while chunk := src.read(1 << 22):
                f.write(chunk)

    _atomic_write(local, write)
    return local


def _search(configured: str | os.PathLike | None, cache_dir: str | os.PathLike | None
            ) -> tuple[Path | None, list[str]]:
    searched: list[str] = []
    if configured is not None and str(configured) != "":
        conf = str(configured)
        if _is_url(conf):
            dest = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
            try:
                return _fetch_url(conf, dest), searched
            except Exception as e:  # noqa: BLE001 - any failure means: not found there
                searched.append(f"{conf} (configured fsspec URL, to be copied to {dest}/: {type(e).__name__}: {e})")
        else:
            p = Path(os.path.expanduser(conf.removeprefix("file://")))
            if p.is_dir():
                if (p / INCEPTION_WEIGHTS_FILENAME).is_file():
                    return p / INCEPTION_WEIGHTS_FILENAME, searched
                searched.append(f"{p / INCEPTION_WEIGHTS_FILENAME} (configured directory: no such file)")
            elif p.is_file():
                return p, searched
            else:
                searched.append(f"{p} (configured path: not found)")
    for p in inception_search_locations():
        if p.is_file():
            return p, searched
        searched.append(f"{p} (torch hub cache of torch-fidelity / torchmetrics: not found)")
    return None, searched


def find_inception_weights(configured: str | os.PathLike | None = None, *,
                           cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local path of the Inception weights, or None. Looks in `configured` (a file, a directory
    holding `INCEPTION_WEIGHTS_FILENAME`, or an fsspec URL copied to `cache_dir`, default the hub
    cache), then in `inception_search_locations()`."""
    return _search(configured, cache_dir)[0]


def require_inception_weights(configured: str | os.PathLike | None = None, *,
                              cache_dir: str | os.PathLike | None = None) -> Path:
    """As `find_inception_weights`, but raises `InceptionWeightsMissing` (listing where it looked)."""
    found, searched = _search(configured, cache_dir)
    if found is None:
        raise InceptionWeightsMissing(searched)
    return found


def load_inception(weights_path: str | os.PathLike, features: Sequence[str] = (INCEPTION_FID_LAYER,),
                   device: str | torch.device | None = None) -> torch.nn.Module:
    """torch-fidelity's `FeatureExtractorInceptionV3` with the given weights file (never downloads).
    `features`: layers among '64', '192', '768', '2048', 'logits_unbiased', 'logits'; its
    forward takes uint8 (B, 3, H, W) and returns a tuple in that order."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: Inception weights file not found")
    try:
        model = FeatureExtractorInceptionV3(INCEPTION_NAME, list(features),
                                            feature_extractor_weights_path=str(weights_path))
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{weights_path}: not a torch-fidelity inception-v3-compat state dict ({e})") from e
    return model.to(_device(device))


def save_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised inception-v3-compat state dict (fixed seed).

    For tests and benchmarks only, where the real weights are absent: numbers computed with it
    are not FID. Built without any download attempt (the loader is stubbed while constructing).
    Convolutions get He-normal weights and the fc layer N(0, 1/2048), so activations keep their
    scale (torch's default init shrinks the pool3 features to ~1e-8, a degenerate test case)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with torch.random.fork_rng(devices=[]), \
            mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(seed)
        model = fe.FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_FID_LAYER])
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        torch.nn.init.normal_(model.fc.weight, std=model.fc.in_features ** -0.5)
    path = Path(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def _inception_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    return lambda x: model(x)


def inception_metrics(sample_images: np.ndarray | torch.Tensor, reference_stats: FeatureStats | None,
                      reference_features: np.ndarray | None, extractor: torch.nn.Module, *,
                      fid_layer: str | None = INCEPTION_FID_LAYER, isc_layer: str | None = INCEPTION_ISC_LAYER,
                      kid: bool = True, isc_splits: int = 10, kid_subsets: int = 100,
                      kid_subset_size: int = 1000, batch_size: int = 256, progress: bool = True,
                      seed: int = 2020) -> dict[str, float]:
    """FID (our `frechet_distance`), IS and KID (torch-fidelity's own functions) of the samples.

    `extractor` is a torch-fidelity feature extractor (`load_inception`) providing `fid_layer`
    (None: no FID / KID) and `isc_layer` (None: no IS); `reference_features` (N_ref, D) are
    needed for KID. Keys: fid, is, is_std, kid, kid_std, kid_subset_size. IS and KID use
    torch-fidelity's defaults (10 splits; 100 subsets of min(1000, N, N_ref); seed 2020). Only the
    2048 layer of the real weights gives numbers comparable to the papers'."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    layers = list(extractor.features_list)
    wanted = [w for w in (fid_layer, isc_layer) if w]
    missing = [w for w in wanted if w not in layers]
    if missing or not wanted:
        raise ValueError(f"extractor: provides layers {layers}, asked for {wanted}")
    n = len(sample_images)
    if fid_layer:
        if reference_stats is None:
            raise ValueError("reference_stats: needed for FID")
        check_count(n, reference_stats.dim, name="samples", network=f"inception {fid_layer}")
        if kid and reference_features is None:
            raise ValueError("reference_features: needed for KID")
    elif n < 2:
        raise ValueError(f"samples: at least 2 images are needed, got {n}")
    device = next(extractor.parameters()).device
    feats = extract_features(sample_images, _inception_fn(extractor), input_kind="uint8", rgb=True,
                             batch_size=batch_size, device=device, progress=progress, desc="inception")
    by_layer = dict(zip(layers, feats))
    out: dict[str, float] = {}
    if fid_layer:
        fid_feats = by_layer[fid_layer]
        if fid_feats.shape[1] != reference_stats.dim:
            raise ValueError(f"reference_stats: {reference_stats.dim}-d, but layer {fid_layer} is "
                             f"{fid_feats.shape[1]}-d")
        out["fid"] = FeatureStats.from_features(fid_feats, name="samples").frechet_distance(reference_stats)
    if isc_layer:
        isc = isc_features_to_metric(torch.from_numpy(by_layer[isc_layer]), splits=isc_splits, shuffle=True,
                                     rng_seed=seed)
        out["is"], out["is_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if fid_layer and kid:
        size = min(kid_subset_size, n, len(reference_features))
        ref = np.array(reference_features, dtype=np.float32)  # a writable copy (it may be a read-only memmap)
        k = kid_features_to_metric(torch.from_numpy(fid_feats), torch.from_numpy(ref), kid_subsets=kid_subsets,
                                   kid_subset_size=size, rng_seed=seed, verbose=False)
        out["kid"], out["kid_std"] = k["kernel_inception_distance_mean"], k["kernel_inception_distance_std"]
        out["kid_subset_size"] = size
    return out


# --------------------------------------------------------------------------------------------
# Classifier fallback


def _block_rows(n_cols: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(1, n_cols)))


def knn_radii(features: np.ndarray | torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (blocked, memory-bounded)."""
    f = torch.as_tensor(features, dtype=torch.float32)
    if k < 1 or len(f) < k + 1:
        raise ValueError(f"features: {len(f)} rows are too few for k={k} nearest neighbours")
    rows = _block_rows(len(f))
    out = torch.empty(len(f))
    for i in range(0, len(f), rows):
        d = torch.cdist(f[i:i + rows], f)
        out[i:i + rows] = d.kthvalue(k + 1, dim=1).values  # the 1st is the row itself, at 0
    return out


def _inside(query: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query row: is it within radii[j] of some points[j]?"""
    rows = _block_rows(len(points))
    out = torch.empty(len(query), dtype=torch.bool)
    for i in range(0, len(query), rows):
        out[i:i + rows] = (torch.cdist(query[i:i + rows], points) <= radii[None, :]).any(dim=1)
    return out


def precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor,
                     k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN radii."""
    real = torch.as_tensor(real_features, dtype=torch.float32)
    fake = torch.as_tensor(fake_features, dtype=torch.float32)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features, fake_features: expected (N, D) and (M, D), got "
                         f"{tuple(real.shape)}, {tuple(fake.shape)}")
    precision = _inside(fake, real, knn_radii(real, k)).float().mean().item()
    recall = _inside(real, fake, knn_radii(fake, k)).float().mean().item()
    return precision, recall


def classifier_inception_score(logits: np.ndarray | torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from logits, in float64, over all rows (one split)."""
    lg = torch.as_tensor(logits, dtype=torch.float64)
    log_p = lg.log_softmax(dim=1)
    log_py = torch.logsumexp(log_p, dim=0) - math.log(len(lg))
    kl = (log_p.exp() * (log_p - log_py[None])).sum(dim=1)
    return float(kl.mean().exp())


def classifier_metrics(sample_images: np.ndarray | torch.Tensor, reference_stats: FeatureStats,
                       classifier: SmallClassifier, reference_features: np.ndarray, *, k: int = 3,
                       batch_size: int = 256, device: str | torch.device | None = "cpu",
                       progress: bool = True, seed: int = 0) -> dict[str, float]:
    """The offline fallback, in the classifier's feature space: fid_classifier, is_classifier,
    precision, recall (see the module docstring). `reference_features` is subsampled (seed) to
    len(samples) for precision / recall when larger."""
    n = len(sample_images)
    check_count(n, reference_stats.dim, name="samples", network=CLASSIFIER_NAME)
    dev = _device(device)
    classifier = classifier.to(dev).eval()
    feats, logits = extract_features(sample_images, classifier.features_and_logits, input_kind="float",
                                     batch_size=batch_size, device=dev, progress=progress, desc="classifier")
    if feats.shape[1] != reference_stats.dim:
        raise ValueError(f"reference_stats: {reference_stats.dim}-d, but the classifier features are "
                         f"{feats.shape[1]}-d")
    ref = reference_features  # possibly a read-only memmap: index or copy, never wrap
    if len(ref) > n:
        ref = ref[np.sort(np.random.default_rng(seed).choice(len(ref), n, replace=False))]
    ref = np.array(ref, dtype=np.float32)
    precision, recall = precision_recall(ref, feats, k=k)
    return {
        "fid_classifier": FeatureStats.from_features(feats, name="samples").frechet_distance(reference_stats),
        "is_classifier": classifier_inception_score(logits),
        "precision": precision,
        "recall": recall,
    }


# --------------------------------------------------------------------------------------------
# Reference statistics (once per prepared dataset) and the score stage


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


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


def _resolve_inception(inception_weights: str | os.PathLike | None, use_inception: bool | None,
                       count: int, what: str) -> Path | None:
    """The Inception weights to use for `count` images, or None for the classifier alone. `auto`
    (use_inception None) also falls back, saying why, when the count is below what FID needs."""
    if use_inception is False:
        return None
    found, searched = _search(inception_weights, None)
    if found is None and use_inception:
        raise InceptionWeightsMissing(searched)
    needed = int(INCEPTION_FID_LAYER) + 1
    if found is not None and use_inception is None and count < needed:
        log.warning("score.use_inception auto: %s are %d images, fewer than the %d an Inception FID needs; "
                    "using the classifier fallback", what, count, needed)
        return None
    return found


def compute_reference_stats(images: np.ndarray | torch.Tensor, reference_dir: str | os.PathLike, *,
                            classifier_path: str | os.PathLike | None = None,
                            inception_weights: str | os.PathLike | None = None,
                            use_inception: bool | None = None, batch_size: int = 256,
                            device: str | torch.device | None = None, progress: bool = True,
                            fingerprint: str | None = None) -> dict[str, Any]:
    """Features of the reference (training) images with every available feature network, written
    to `reference_dir` (layout in the module docstring); returns the meta dict.

    Networks: the classifier if `classifier_path` is given; Inception if `use_inception` is True
    (raise if the weights are missing) or None (if `find_inception_weights(inception_weights)`
    finds them). `fingerprint` (of the prepared dataset) is recorded for `ensure_reference_stats`.
    """
    validate_images(images, name="images")
    weights = _resolve_inception(inception_weights, use_inception, len(images), "the reference images")
    if classifier_path is None and weights is None:
        raise InceptionWeightsMissing(_search(inception_weights, None)[1],
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
        check_count(n, int(INCEPTION_FID_LAYER), name="images", network=f"inception {INCEPTION_FID_LAYER}")
    dev = _device(device)
    out_dir = Path(reference_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    networks: dict[str, Any] = {}
    if classifier is not None:
        feats = extract_features(images, classifier.to(dev).features, input_kind="float", batch_size=batch_size,
                                 device=dev, progress=progress, desc="reference classifier")
        FeatureStats.from_features(feats, name="images").save(out_dir / CLASSIFIER_STATS)
        _atomic_write(out_dir / CLASSIFIER_FEATURES, lambda f: np.save(f, feats))
        networks[CLASSIFIER_NAME] = {
            "file": str(classifier_path), "sha256": file_sha256(classifier_path),
            "feature_dim": classifier.feature_dim, "test_accuracy": classifier.meta.get("test_accuracy"),
            "stats": CLASSIFIER_STATS, "features": CLASSIFIER_FEATURES}
    if weights is not None:
        model = load_inception(weights, [INCEPTION_FID_LAYER], dev)
        feats = extract_features(images, _inception_fn(model), input_kind="uint8", rgb=True,
                                 batch_size=batch_size, device=dev, progress=progress, desc="reference inception")[0]
        FeatureStats.from_features(feats, name="images").save(out_dir / INCEPTION_STATS)
        _atomic_write(out_dir / INCEPTION_FEATURES, lambda f: np.save(f, feats))
        networks[INCEPTION_NAME] = {
            "file": str(weights), "sha256": file_sha256(weights), "feature_dim": int(INCEPTION_FID_LAYER),
            "stats": INCEPTION_STATS, "features": INCEPTION_FEATURES}
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
        weights = _resolve_inception(inception_weights, use_inception, len(images), "the reference images")
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


def _reference_files(reference_dir: Path, meta: dict, name: str, file: str | os.PathLike
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
    stats = FeatureStats.load(reference_dir / info["stats"])
    feats_path = reference_dir / info["features"]
    if not feats_path.is_file():
        raise FileNotFoundError(f"{feats_path}: reference features not found")
    feats = np.load(feats_path, mmap_mode="r")
    if feats.ndim != 2 or feats.shape[1] != stats.dim:
        raise ValueError(f"{feats_path}: expected (N, {stats.dim}) features, got {feats.shape}")
    return stats, feats


def score_samples(samples: np.ndarray | torch.Tensor, *, reference_dir: str | os.PathLike,
                  classifier_path: str | os.PathLike | None = None,
                  inception_weights: str | os.PathLike | None = None, use_inception: bool | None = None,
                  batch_size: int = 256, device: str | torch.device | None = None, progress: bool = True,
                  isc_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                  samples_name: str = "samples") -> dict[str, Any]:
    """Score (N, C, H, W) samples (uint8, or float in [-1, 1]) against `reference_dir`.

    Everything is validated before any feature is computed: the samples (shape equal to the
    reference's, range, N >= 2 and N >= D + 1 of each network used), the reference files, and
    that the classifier / weights are those the reference was computed with. Errors name
    `samples_name` or the file.

    Inception is used if `use_inception` is True (InceptionWeightsMissing if the weights are not
    found) or None (if found): keys fid, is, is_std, kid, kid_std, kid_subset_size. With a
    `classifier_path`, the fallback keys fid_classifier, is_classifier, precision, recall too.
    Always: feature_network (the network behind the headline distance: 'inception-v3-compat'
    or 'classifier'), num_samples, num_reference, inception_weights (path or None),
    classifier_test_accuracy (when a classifier is used).
    """
    reference_dir = Path(reference_dir)
    meta = load_reference_meta(reference_dir)
    validate_images(samples, name=samples_name, expected_shape=meta["image_shape"])
    n = len(samples)
    weights = _resolve_inception(inception_weights, use_inception, n, samples_name)
    if weights is not None and use_inception is None and INCEPTION_NAME not in meta["networks"]:
        log.warning("score.use_inception auto: %s has no Inception statistics (too few reference images when it "
                    "was computed); using the classifier fallback", reference_dir)
        weights = None
    if weights is None and classifier_path is None:
        raise InceptionWeightsMissing(_search(inception_weights, None)[1],
                                      "and no classifier_path was given for the offline fallback")
    plan: dict[str, tuple[FeatureStats, np.ndarray]] = {}
    if weights is not None:
        plan[INCEPTION_NAME] = _reference_files(reference_dir, meta, INCEPTION_NAME, weights)
        check_count(n, plan[INCEPTION_NAME][0].dim, name=samples_name, network=f"inception {INCEPTION_FID_LAYER}")
    classifier = None
    if classifier_path is not None:
        plan[CLASSIFIER_NAME] = _reference_files(reference_dir, meta, CLASSIFIER_NAME, classifier_path)
        check_count(n, plan[CLASSIFIER_NAME][0].dim, name=samples_name, network=CLASSIFIER_NAME)
        classifier = load_classifier(classifier_path)
    dev = _device(device)
    result: dict[str, Any] = {
        "feature_network": INCEPTION_NAME if weights is not None else CLASSIFIER_NAME,
        "num_samples": n, "num_reference": int(meta["num_images"]),
        "inception_weights": str(weights) if weights is not None else None}
    if weights is not None:
        stats, feats = plan[INCEPTION_NAME]
        model = load_inception(weights, list(dict.fromkeys([INCEPTION_FID_LAYER, INCEPTION_ISC_LAYER])), dev)
        result.update(inception_metrics(samples, stats, feats, model, fid_layer=INCEPTION_FID_LAYER,
                                        isc_layer=INCEPTION_ISC_LAYER, isc_splits=isc_splits,
                                        kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                        batch_size=batch_size, progress=progress))
    if classifier is not None:
        stats, feats = plan[CLASSIFIER_NAME]
        result.update(classifier_metrics(samples, stats, classifier, feats, batch_size=batch_size, device=dev,
                                         progress=progress))
        result["classifier_test_accuracy"] = classifier.meta.get("test_accuracy")
    return result
