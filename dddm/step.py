"""One uDDDM training step (the body of Algorithm 1's loop), without the optimizer.

The store and the training loop wrap it: they gather `x0_est` for the batch's dataset
indices, call `training_step`, back-propagate `terms.total`, and scatter `new_estimates`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import Diffusion
from .losses import LossTerms, udddm_loss
from .rng import STREAM_TRAIN_NOISE, timestep_and_noise_per_index


@dataclass
class StepOutput:
    terms: LossTerms
    new_estimates: torch.Tensor  # f_theta(x0_est, x_t, t), detached: the model's prediction, never x0


def training_step(net, diffusion: Diffusion, x0: torch.Tensor, indices: torch.Tensor, x0_est: torch.Tensor,
                  epoch: int, metric, seed: int) -> StepOutput:
    """Noise x0 with t ~ U{1..T} and eps ~ N(0, I) drawn per (seed, epoch, dataset index) -- so a
    sample's noise does not depend on which process or batch it lands in -- predict with f_theta
    conditioned on the previous estimate, and return the adaptive loss terms and the new estimates."""
    t, eps = timestep_and_noise_per_index(indices.cpu(), tuple(x0.shape[1:]), diffusion.T,
                                          seed, STREAM_TRAIN_NOISE, epoch)
    t, eps = t.to(x0.device), eps.to(x0.device)
    x_t = diffusion.add_noise(x0, t, eps)
    pred = diffusion.denoise(net, x0_est, x_t, t)
    terms = udddm_loss(pred, x0, x0_est, epoch, metric)
    return StepOutput(terms=terms, new_estimates=pred.detach())
