"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
a denoiser with EDM's preconditioning and loss weighting, sampled with Heun's 2nd-order method.
The quality this network reaches with many network evaluations: the ceiling of the comparison.

Formulas as in NVlabs/edm `training/networks.py` (EDMPrecond), `training/loss.py` (EDMLoss) and
`generate.py` (edm_sampler, deterministic: S_churn = 0).
"""

from __future__ import annotations


import torch
from pydantic import Field

from ..processes import karras_sigmas
from ..rng import STREAM_SAMPLE_PRIOR, STREAM_TRAIN_NOISE, normal_per_index, uniform_and_noise_per_index
from ..schema import Section
from .base import LossOutput, Method, Progress


def precondition(net, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float, sigma_min: float = 0.0) -> torch.Tensor:
    """c_skip x + c_out F(c_in x; c_noise) with c_skip = sd^2 / ((sigma - s0)^2 + sd^2),
    c_out = (sigma - s0) sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    s0 = 0 is EDM's denoiser; s0 = sigma_min is the consistency models' boundary condition f(x, sigma_min) = x.
    `sigma` has shape (B, 1, 1, 1)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
    F = net(None, x * c_in, sigma.flatten().log() / 4)
    return c_skip * x + c_out * F.to(x.dtype)


class EDM(Method):
    name = "edm"

    class Config(Section):
        sigma_min: float = Field(gt=0.0)
        sigma_max: float = Field(gt=0.0)
        sigma_data: float = Field(gt=0.0)
        rho: float = Field(gt=0.0, allow_inf_nan=True)  # .inf: geometric levels (dddm.processes.karras_sigmas)
        p_mean: float  # training: ln sigma ~ N(p_mean, p_std^2)
        p_std: float = Field(gt=0.0)
        # sampler.edm.steps: Heun steps N, 2N - 1 network evaluations

    def loss(self, net, x0, indices, progress: Progress, estimates=None) -> LossOutput:
        """lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 (mean over pixels, then over the batch),
        lambda = (sigma^2 + sd^2) / (sigma sd)^2, ln sigma ~ N(P_mean, P_std^2), drawn per (seed, epoch, index)."""
        c = self.cfg
        u, noise = uniform_and_noise_per_index(indices.cpu(), tuple(x0.shape[1:]), self.seed,
                                               STREAM_TRAIN_NOISE, progress.epoch)
        normal = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))
        sigma = (c.p_mean + c.p_std * normal).exp().float().view(-1, 1, 1, 1).to(x0.device)
        denoised = precondition(net, x0 + sigma * noise.to(x0.device), sigma, c.sigma_data)
        weight = (sigma ** 2 + c.sigma_data ** 2) / (sigma * c.sigma_data) ** 2
        per_sample = (weight * (denoised.float() - x0) ** 2).flatten(1).mean(dim=1)
        return LossOutput(total=per_sample.mean())

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """sigma_max down to sigma_min over `steps` levels (rho spacing), then 0; float64."""
        c = self.cfg
        levels = karras_sigmas(steps, c.sigma_min, c.sigma_max, c.rho).flip(0) if steps > 1 \
            else torch.tensor([c.sigma_max], dtype=torch.float64)
        return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])

    def generate(self, net, indices, shape, steps, device):
        """Heun's 2nd-order method on the probability-flow ODE, Euler on the last step (to sigma 0)."""
        c = self.cfg
        sigmas = self.sampling_sigmas(steps).tolist()
        x = normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_PRIOR).to(device).double() * sigmas[0]

        def slope(x: torch.Tensor, s: float) -> torch.Tensor:
            sigma = torch.full((x.shape[0], 1, 1, 1), s, device=device)
            return (x - precondition(net, x.float(), sigma, c.sigma_data).double()) / s

        for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
            d = slope(x, cur)
            x_next = x + (nxt - cur) * d
            if nxt > 0:
                x_next = x + (nxt - cur) * 0.5 * (d + slope(x_next, nxt))
            x = x_next
        return x.float().clamp(-1.0, 1.0)

    def evaluations(self, steps: int) -> int:
        return 2 * steps - 1


