"""The offline fallback when the Inception weights are absent: Frechet distance, inception score,
precision and recall in the feature space of the prepare stage's classifier, under their own
names, never `fid` / `is` (docs/scoring.md, "The offline fallback")."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..classifier import SmallClassifier
from .features import default_device, extract_features
from .frechet import FeatureStats, check_count
from .precision_recall import precision_recall

CLASSIFIER_NAME = "classifier"


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
    precision, recall (docs/scoring.md). `reference_features` is subsampled (seed) to
    len(samples) for precision / recall when larger."""
    n = len(sample_images)
    check_count(n, reference_stats.dim, name="samples", network=CLASSIFIER_NAME)
    dev = default_device(device)
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
