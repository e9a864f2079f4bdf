"""iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models"): consistency
training without a teacher network or EMA target, one-step and multistep consistency sampling.

Checked against the paper (Sec. 3-5) and Kinyugo/consistency_models (`ImprovedConsistencyTraining`,
`improved_timesteps_schedule`, `lognormal_timestep_distribution`, `improved_loss_weighting`), and
openai/consistency_models `karras_diffusion.py` (`stochastic_iterative_sampler`). One difference from
Kinyugo's code, where this follows the paper: the pseudo-Huber metric is taken over the whole sample
vector, d(x, y) = sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(dim), not per element.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, PositiveInt, model_validator

from ..losses import pseudo_huber
from ..processes import karras_sigmas
from ..rng import (STREAM_SAMPLE_PRIOR, STREAM_SAMPLE_STEP, STREAM_TRAIN_NOISE, normal_per_index,
                   uniform_and_noise_per_index)
from ..schema import Section, at_most
from .base import LossOutput, Method, Progress, SamplerConfig
from .edm import precondition


def discretisation_steps(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)): the number of
    noise levels at training step k of K, doubling from s0 + 1 to s1 + 1."""
    stage = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** (k // max(stage, 1)), s1) + 1


def index_probabilities(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std)),
    i = 0..N-2 over ascending sigmas: the lognormal's mass between neighbouring levels."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def check_mid_sigmas(method: str, sigmas: tuple[float, ...], sigma_min: float, sigma_max: float) -> None:
    """The re-noising levels of a multistep consistency sampler lie strictly inside (sigma_min, sigma_max)."""
    if any(not sigma_min < s < sigma_max for s in sigmas):
        raise ValueError(f"sampler.{method}.sigmas: {list(sigmas)} must lie between method.{method}.sigma_min "
                         f"and method.{method}.sigma_max")


class ICT(Method):
    name = "ict"
    terms = ("levels",)

    class Config(Section):
        sigma_min: float = Field(gt=0.0)
        sigma_max: float = Field(gt=0.0)
        sigma_data: float = Field(gt=0.0)
        rho: float = Field(gt=0.0, allow_inf_nan=True)  # .inf: geometric levels (dddm.processes.karras_sigmas)
        s0: PositiveInt  # discretisation curriculum: s0 + 1 levels at first ...
        # ... doubling up to s1 + 1; each training step builds a table of up to s1 + 1 levels (2^40 would be 8 TB)
        s1: Annotated[PositiveInt, at_most(10**6, "every training step builds a table of s1 + 1 noise levels")]
        p_mean: float  # noise index drawn from a lognormal over sigma
        p_std: float = Field(gt=0.0)
        huber_scale: float = Field(gt=0.0)  # c = huber_scale * sqrt(dim) (the paper: 0.00054)

        @model_validator(mode="after")
        def _consistent(self):
            if not self.sigma_min < self.sigma_max:
                raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
            if self.s1 < self.s0:
                raise ValueError(f"s1 ({self.s1}) must be >= s0 ({self.s0})")
            return self

    class SamplerConfig(SamplerConfig):
        sigmas: tuple[float, ...]  # the noise level of step 2, 3, ... (CIFAR-10 two-step: 0.821)

        @model_validator(mode="after")
        def _enough_levels(self):
            if len(self.sigmas) < max(self.steps) - 1:
                raise ValueError(f"sigmas: {len(self.sigmas)} level(s) for {max(self.steps)}-step sampling; "
                                 f"it needs {max(self.steps) - 1}")
            return self

    def __init__(self, cfg: Config, sampler: SamplerConfig, seed: int):
        super().__init__(cfg, sampler, seed)
        check_mid_sigmas(self.name, sampler.sigmas, cfg.sigma_min, cfg.sigma_max)

    def f(self, net, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The consistency function, f(x, sigma_min) = x by construction."""
        return precondition(net, x, sigma, self.cfg.sigma_data, self.cfg.sigma_min)

    def loss(self, net, x0, indices, progress: Progress, estimates=None) -> LossOutput:
        """lambda_i d(f(x0 + sigma_{i+1} z, sigma_{i+1}), sg f(x0 + sigma_i z, sigma_i)), lambda_i =
        1 / (sigma_{i+1} - sigma_i), the same z on both sides, the target from the current weights
        without gradient; i and z drawn per (seed, epoch, index)."""
        c = self.cfg
        levels = discretisation_steps(progress.step, progress.total_steps, c.s0, c.s1)
        sigmas = karras_sigmas(levels, c.sigma_min, c.sigma_max, c.rho)
        u, z = uniform_and_noise_per_index(indices.cpu(), tuple(x0.shape[1:]), self.seed,
                                           STREAM_TRAIN_NOISE, progress.epoch)
        cdf = index_probabilities(sigmas, c.p_mean, c.p_std).cumsum(0)
        i = torch.searchsorted(cdf, u, right=True).clamp(max=levels - 2)
        lo, hi = (sigmas[j].float().view(-1, 1, 1, 1).to(x0.device) for j in (i, i + 1))
        z = z.to(x0.device)
        weight = (1.0 / (sigmas[i + 1] - sigmas[i])).float().to(x0.device)
        student = self.f(net, x0 + hi * z, hi)
        with torch.no_grad():
            target = self.f(net, x0 + lo * z, lo)
        c_huber = c.huber_scale * math.sqrt(x0[0].numel())
        per_sample = weight * pseudo_huber(student.float(), target.float(), c_huber)
        return LossOutput(total=per_sample.mean(), terms={"levels": float(levels)})

    def generate(self, net, indices, shape, steps, device):
        """x = f(sigma_max z, sigma_max); each further step re-noises to tau (sampler.ict.sigmas) and applies f,
        clamping to [-1, 1] after each step (openai/consistency_models' stochastic_iterative_sampler)."""
        c = self.cfg
        z = normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_PRIOR).to(device)
        sigma = torch.full((len(indices), 1, 1, 1), c.sigma_max, device=device)
        x = self.f(net, c.sigma_max * z, sigma).clamp(-1.0, 1.0)
        for k, tau in enumerate(self.sampler.sigmas[:steps - 1], start=1):
            z = normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_STEP, k).to(device)
            sigma = torch.full_like(sigma, tau)
            x = self.f(net, x + math.sqrt(tau ** 2 - c.sigma_min ** 2) * z, sigma).clamp(-1.0, 1.0)
        return x

    def evaluations(self, steps: int) -> int:
        return steps
