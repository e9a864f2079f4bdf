"""Scoring samples: FID, IS and KID as the field computes them (torch-fidelity's Inception), and an
honestly named fallback in a small classifier's feature space. The choices and their reasons
(library, weights search, sample counts, the reference layout) are in docs/scoring.md."""

from .fallback import CLASSIFIER_NAME, classifier_inception_score, classifier_metrics
from .features import default_device, extract_features, validate_images
from .frechet import FeatureStats, check_count, frechet_distance
from .inception import (INCEPTION_FID_LAYER, INCEPTION_ISC_LAYER, INCEPTION_NAME, INCEPTION_WEIGHTS_FILENAME,
                        INCEPTION_WEIGHTS_URL, InceptionWeightsMissing, find_inception_weights,
                        inception_search_locations, load_inception, require_inception_weights)
from .inception_metrics import inception_metrics
from .precision_recall import knn_radii, precision_recall
from .reference import (CLASSIFIER_FEATURES, CLASSIFIER_STATS, INCEPTION_FEATURES, INCEPTION_STATS, META_FILE,
                        compute_reference_stats, ensure_reference_stats, load_reference_meta)
from .score import score_samples

__all__ = [
    "CLASSIFIER_FEATURES", "CLASSIFIER_NAME", "CLASSIFIER_STATS", "INCEPTION_FEATURES", "INCEPTION_FID_LAYER",
    "INCEPTION_ISC_LAYER", "INCEPTION_NAME", "INCEPTION_STATS", "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL", "META_FILE", "FeatureStats", "InceptionWeightsMissing", "check_count",
    "classifier_inception_score", "classifier_metrics", "compute_reference_stats", "default_device",
    "ensure_reference_stats", "extract_features", "find_inception_weights", "frechet_distance",
    "inception_metrics", "inception_search_locations", "knn_radii", "load_inception", "load_reference_meta",
    "precision_recall", "require_inception_weights", "score_samples", "validate_images",
]
