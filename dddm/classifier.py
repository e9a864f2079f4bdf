"""A small CNN classifier: the offline feature network for scoring.

When the FID Inception weights are not available (no internet), `dddm.scoring` measures
samples in the feature space of this classifier instead, trained in the classifier stage on the
prepared dataset's labels. Its numbers are reported under their own names
(`fid_classifier`, ...), never as FID; see `dddm.scoring`.

Input: float images (B, C, H, W) in [-1, 1], C = 1 or 3, H = W in 8..64.
Output: `forward(x)` -> logits (B, num_classes); `features(x)` -> (B, feature_dim), the
penultimate embedding (a linear map of globally pooled conv features, taken before the
last ReLU so no unit is identically zero and the feature covariance stays full rank).

Training is deterministic given the seed (same machine, same thread count): the weights,
the holdout split and the batch order all come from generators seeded by it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_open
from .integrity import IntegrityError, weights_sha256
from .pixels import to_float
from .progress import progress as progress_bar

FORMAT = "dddm-classifier-v1"
# the pipeline keeps the file in git (dvc.yaml): the committed one is a remedy, retraining the other
RETRAIN = "restore it from git (`git checkout -- {path}`) or retrain it (`dvc repro -f classifier`)"
MIN_SIZE, MAX_SIZE = 8, 64
FEATURE_DIM = 128  # the classifier stage's: a Frechet distance in its space needs FEATURE_DIM + 1 samples


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SmallClassifier(nn.Module):
    """Two conv blocks (width, 2 width; 2x max pooling after each) -> conv (4 width) + BN ->
    global average pool -> Linear(4 width, feature_dim) = `features` -> ReLU -> Dropout ->
    Linear(feature_dim, num_classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, *, width: int = 32,
                 feature_dim: int = FEATURE_DIM, dropout: float = 0.1):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: expected 1 or 3, got {in_channels}")
        if not MIN_SIZE <= image_size <= MAX_SIZE:
            raise ValueError(f"image_size: expected {MIN_SIZE}..{MAX_SIZE}, got {image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        if width < 1 or feature_dim < 1:
            raise ValueError(f"width, feature_dim: expected >= 1, got {width}, {feature_dim}")
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                           width=width, feature_dim=feature_dim, dropout=dropout)
        self.trunk = nn.Sequential(
            _block(in_channels, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.MaxPool2d(2),
            # no ReLU before pooling: a dead unit would make the feature covariance singular
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False), nn.BatchNorm2d(4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Linear(4 * width, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"x: expected (B, {c}, {s}, {s}) images, got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [-1, 1] -> (B, feature_dim) penultimate embedding."""
        self._check(x)
        return self.embed(self.trunk(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


HOLDOUT_FRACTION = 0.2  # the share of images kept out of the classifier's training


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (train, holdout) index split `train_classifier` uses for this n, fraction and seed."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: expected in (0, 1), got {holdout_fraction}")
    n_hold = int(round(n * holdout_fraction))
    if n_hold < 1 or n - n_hold < 2:
        raise ValueError(f"images: {n} images are too few for holdout_fraction={holdout_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


@torch.no_grad()
def accuracy(model: SmallClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / max(1, len(images))


def train_classifier(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int, *,
                     epochs: int = 15, batch_size: int = 64, seed: int = 0, holdout_fraction: float = HOLDOUT_FRACTION,
                     lr: float = 2e-3, width: int = 32, feature_dim: int = FEATURE_DIM,
                     progress: bool = True) -> tuple[SmallClassifier, float]:
    """Train a `SmallClassifier` on (N, C, H, W) images (uint8 or float in [-1, 1]) and int labels.

    A `holdout_fraction` of the images (`split_indices(N, holdout_fraction, seed)`) is kept out of
    training; returns (model in eval mode on the CPU, its accuracy on that holdout). Adam with a
    cosine learning-rate decay; random +-1 pixel shifts as the only augmentation.
    """
    x = to_float(images)
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise ValueError(f"images: expected (N, C, H, H) with C in (1, 3), got {tuple(x.shape)}")
    if y.shape != (len(x),):
        raise ValueError(f"labels: expected shape ({len(x)},), got {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels: expected values in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if not torch.isfinite(x).all() or x.abs().max() > 1.0 + 1e-3:
        raise ValueError("images: float images must be finite and in [-1, 1]")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs, batch_size: expected >= 1, got {epochs}, {batch_size}")
    train_idx, hold_idx = split_indices(len(x), holdout_fraction, seed)
    x_tr, y_tr = x[train_idx], y[train_idx]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(x.shape[1], x.shape[2], num_classes, width=width, feature_dim=feature_dim)
        gen = torch.Generator().manual_seed(seed + 1)
        steps_per_epoch = (len(x_tr) + batch_size - 1) // batch_size
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        bar = progress_bar(epochs, "classifier", unit="epoch", disable=not progress)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x_tr), generator=gen)
            total = 0.0
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                xb = x_tr[idx]
                shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
                xb = torch.roll(xb, shifts=shift, dims=(2, 3))
                loss = F.cross_entropy(model(xb), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(x_tr):.4f}")
            bar.update()
        bar.close()
    model.eval()
    test_accuracy = accuracy(model, x[hold_idx], y[hold_idx])
    return model, test_accuracy


def save_classifier(model: SmallClassifier, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write the architecture args, the weights and `meta` (e.g. test_accuracy) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "arch": dict(model.config), "state_dict": state,
               "weights_sha256": weights_sha256(state), "meta": dict(meta or {})}
    with atomic_open(path) as f:
        torch.save(payload, f)
    return path


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SmallClassifier:
    """Rebuild the classifier saved by `save_classifier`; its meta dict is at `model.meta`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier file not found (written by the classifier stage)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not a readable classifier file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    remedy = RETRAIN.format(path=path)
    if "weights_sha256" not in payload:
        raise IntegrityError(f"{path}: has no checksum of its weights (written by an older version); {remedy}")
    if weights_sha256(payload["state_dict"]) != payload["weights_sha256"]:
        raise IntegrityError(f"{path}: the weights do not match the file's checksum (the file was damaged); {remedy}")
    model = SmallClassifier(**payload["arch"])
    model.load_state_dict(payload["state_dict"])
    model.meta = dict(payload.get("meta", {}))
    return model.eval()
