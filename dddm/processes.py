"""uDDDM's noise processes (VP, VE) and its unified parameterization f = a(sigma_t) x_t + b(sigma_t) F.

Timesteps are integers t in {1, ..., T}. Schedules are computed in float64 and indexed by t - 1,
so `x_t` for the same (x0, t, eps) is the same on every device. A new process is one subclass
registered in PROCESSES plus its params section.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Annotated

import torch
from pydantic import Field, model_validator

from .schema import Section, at_most

# The paper's pseudo-Huber constant c per process (uDDDM, Sec. 4).
PAPER_HUBER_C = {"vp": 0.00014, "ve": 0.00015}
# T's bound: a process's schedule is a float64 table of T values, built wherever the method is (every method
# stage and the check): 8 MB at 10^6, where T = 2 * 10^9 made the check allocate 16 GB. The paper's: 1000, 8000.
Timesteps = Annotated[int, Field(ge=2), at_most(10**6, "the schedule is a table of T values, built by every stage")]


def vp_alpha_bar(T: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), betas linear from beta_min to beta_max over T steps."""
    betas = torch.linspace(beta_min, beta_max, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """sigma_i = (sigma_min^(1/rho) + (i-1)/(n-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..n,
    ascending, float64; rho = inf gives the geometric sequence of the VE SDE."""
    frac = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    if math.isinf(rho):
        return sigma_min * (sigma_max / sigma_min) ** frac
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + frac * (hi - lo)) ** rho


def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t - 1] as float32 of shape (B, 1, 1, 1) on t's device."""
    return table.to(t.device)[t.long() - 1].float().view(-1, 1, 1, 1)


class NoiseProcess(ABC):
    """A forward process x_t(x0, t, eps) with uDDDM's denoiser f_theta(x0_est, x_t, t)."""

    name: str
    Config: type[Section]

    def __init__(self, cfg: Section):
        self.cfg = cfg
        self.T = cfg.T

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of x_t, shape (B, 1, 1, 1)."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The forward process x_t."""

    @abstractmethod
    def prior(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T for sampling, from standard normal noise."""

    @abstractmethod
    def skip_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of f = a x_t + b F."""

    @abstractmethod
    def input_scale(self, t: torch.Tensor) -> torch.Tensor:
        """Scale applied to x_t before the network sees it (part of F_theta's preconditioning)."""

    @property
    def paper_huber_c(self) -> float:
        return PAPER_HUBER_C[self.name]

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: (t - 1) / (T - 1) in [0, 1]."""
        return (t.float() - 1.0) / (self.T - 1)

    def denoise(self, net, x0_est: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f_theta(x0_est, x_t, t) = a(sigma_t) x_t + b(sigma_t) F_theta(x0_est, x_t, t)."""
        a, b = self.skip_coefficients(t)
        F = net(x0_est, x_t * self.input_scale(t), self.noise_label(t))
        return a * x_t + b * F.to(x_t.dtype)


class VP(NoiseProcess):
    """Variance preserving: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps; f = x_t - F (a = 1, b = -1)."""

    name = "vp"

    class Config(Section):
        T: Timesteps
        beta_min: float = Field(gt=0.0, lt=1.0)
        beta_max: float = Field(gt=0.0, lt=1.0)

        @model_validator(mode="after")
        def _ordered(self):
            if self.beta_min > self.beta_max:
                raise ValueError(f"beta_min ({self.beta_min}) must be <= beta_max ({self.beta_max})")
            return self

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._alpha_bar = vp_alpha_bar(cfg.T, cfg.beta_min, cfg.beta_max)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return _at(self._alpha_bar, t)

    def sigma(self, t):
        return _at((1.0 - self._alpha_bar).sqrt(), t)

    def add_noise(self, x0, t, eps):
        ab = self.alpha_bar(t)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def prior(self, noise):
        return noise

    def skip_coefficients(self, t):
        one = torch.ones(t.shape[0], 1, 1, 1, device=t.device)
        return one, -one

    def input_scale(self, t):  # VP inputs already have unit variance
        return torch.ones(t.shape[0], 1, 1, 1, device=t.device)


class VE(NoiseProcess):
    """Variance exploding: x_t = x0 + sigma_t eps (sigma, not sigma^2), Karras sigmas;
    f = kappa x_t + (1 - kappa) F with kappa = sigma_min / sigma_t."""

    name = "ve"

    class Config(Section):
        T: Timesteps
        sigma_min: float = Field(gt=0.0)
        sigma_max: float = Field(gt=0.0)
        rho: float = Field(gt=0.0, allow_inf_nan=True)  # .inf: the geometric schedule

        @model_validator(mode="after")
        def _ordered(self):
            if self.sigma_min >= self.sigma_max:
                raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
            return self

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.sigma_min, self.sigma_max = cfg.sigma_min, cfg.sigma_max
        self._sigma = karras_sigmas(cfg.T, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    def sigma(self, t):
        return _at(self._sigma, t)

    def add_noise(self, x0, t, eps):
        return x0 + self.sigma(t) * eps

    def prior(self, noise):
        return noise * self.sigma_max

    def skip_coefficients(self, t):
        kappa = self.sigma_min / self.sigma(t)
        return kappa, 1.0 - kappa

    def input_scale(self, t):
        """VE inputs reach sigma_max in magnitude: brought to unit variance (sigma_data = 0.5, as in EDM)."""
        return 1.0 / (self.sigma(t) ** 2 + 0.25).sqrt()


PROCESSES: dict[str, type[NoiseProcess]] = {p.name: p for p in (VP, VE)}
