"""The scores of one sample set: the distances of dddm.scoring and class coverage.

Class coverage: a generator that collapses onto a few modes can still reach a fair distance score;
the histogram of the scoring classifier's predicted labels and the number of classes holding at
least 3% of the samples make that visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .classifier import SmallClassifier, load_classifier
from .headline import HEADLINE, fid_name, headline  # noqa: F401 (the names other modules import from here)
from .pixels import to_float
from .scoring import score_samples

MIN_SHARE = 0.03  # a class counts as covered when it holds at least 3% of the samples


@torch.no_grad()
def predicted_labels(images: np.ndarray | torch.Tensor, classifier: SmallClassifier, batch_size: int = 512) -> np.ndarray:
    """The classifier's label for each image (uint8, or float in [-1, 1])."""
    x = to_float(images)
    classifier = classifier.eval()
    return torch.cat([classifier(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def class_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def classes_covered(histogram: list[int], min_share: float = MIN_SHARE) -> int:
    """How many classes hold at least `min_share` of the samples."""
    total = sum(histogram)
    return sum(1 for count in histogram if total and count / total >= min_share)


def evaluate_samples(images: np.ndarray, reference_dir: Path, classifier_path: Path, score_cfg, device,
                     name: str) -> dict:
    """score_samples (FID/IS/KID or the classifier fallback) plus the class histogram and coverage."""
    result = score_samples(images, reference_dir=reference_dir, classifier_path=classifier_path,
                           inception_weights=score_cfg.inception_weights,
                           use_inception=score_cfg.inception_required, batch_size=score_cfg.batch_size,
                           device=device, samples_name=name, progress=False)
    classifier = load_classifier(classifier_path)
    histogram = class_histogram(predicted_labels(images, classifier), classifier.num_classes)
    return result | {"class_histogram": histogram, "classes": classes_covered(histogram)}
