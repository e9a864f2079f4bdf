"""A randomly initialised inception-v3-compat weights file, for tests and benchmarks on machines
without the real FID weights (numbers computed with it are not FID)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import torch

from dddm.scoring import INCEPTION_FID_LAYER, INCEPTION_NAME


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
    torch.save(state, path)
    return path
