"""FID, IS and KID of samples with the Inception network: our Frechet distance, torch-fidelity's
own IS and KID on our features."""

from __future__ import annotations

import numpy as np
import torch

from .features import extract_features
from .frechet import FeatureStats, check_count
from .inception import INCEPTION_FID_LAYER, INCEPTION_ISC_LAYER, inception_fn


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
    feats = extract_features(sample_images, inception_fn(extractor), input_kind="uint8", rgb=True,
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
