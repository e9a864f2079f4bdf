"""Scoring a sample set against the reference statistics: Inception FID / IS / KID when the
weights are there, the classifier fallback when a classifier is given, everything validated first."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classifier import load_classifier
from . import inception
from .fallback import CLASSIFIER_NAME, classifier_metrics
from .features import default_device, validate_images
from .frechet import FeatureStats, check_count
from .inception import INCEPTION_NAME, InceptionWeightsMissing, load_inception, resolve_inception, search_inception_weights
from .inception_metrics import inception_metrics
from .reference import load_reference_meta, reference_files

log = logging.getLogger(__name__)


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
    weights = resolve_inception(inception_weights, use_inception, n, samples_name)
    if weights is not None and use_inception is None and INCEPTION_NAME not in meta["networks"]:
        log.warning("score.use_inception auto: %s has no Inception statistics (too few reference images when it "
                    "was computed); using the classifier fallback", reference_dir)
        weights = None
    if weights is None and classifier_path is None:
        raise InceptionWeightsMissing(search_inception_weights(inception_weights, None)[1],
                                      "and no classifier_path was given for the offline fallback")
    plan: dict[str, tuple[FeatureStats, np.ndarray]] = {}
    if weights is not None:
        plan[INCEPTION_NAME] = reference_files(reference_dir, meta, INCEPTION_NAME, weights)
        check_count(n, plan[INCEPTION_NAME][0].dim, name=samples_name, network=f"inception {inception.INCEPTION_FID_LAYER}")
    classifier = None
    if classifier_path is not None:
        plan[CLASSIFIER_NAME] = reference_files(reference_dir, meta, CLASSIFIER_NAME, classifier_path)
        check_count(n, plan[CLASSIFIER_NAME][0].dim, name=samples_name, network=CLASSIFIER_NAME)
        classifier = load_classifier(classifier_path)
    dev = default_device(device)
    result: dict[str, Any] = {
        "feature_network": INCEPTION_NAME if weights is not None else CLASSIFIER_NAME,
        "num_samples": n, "num_reference": int(meta["num_images"]),
        "inception_weights": str(weights) if weights is not None else None}
    if weights is not None:
        stats, feats = plan[INCEPTION_NAME]
        model = load_inception(weights, list(dict.fromkeys([inception.INCEPTION_FID_LAYER, inception.INCEPTION_ISC_LAYER])), dev)
        result.update(inception_metrics(samples, stats, feats, model, fid_layer=inception.INCEPTION_FID_LAYER,
                                        isc_layer=inception.INCEPTION_ISC_LAYER, isc_splits=isc_splits,
                                        kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                        batch_size=batch_size, progress=progress))
    if classifier is not None:
        stats, feats = plan[CLASSIFIER_NAME]
        result.update(classifier_metrics(samples, stats, classifier, feats, batch_size=batch_size, device=dev,
                                         progress=progress))
        result["classifier_test_accuracy"] = classifier.meta.get("test_accuracy")
    return result
