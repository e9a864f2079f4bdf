"""Noise processes (VP, VE) and the unified uDDDM parameterization.

Timesteps are integers t in {1, ..., T}. Schedules are computed in float64 and
indexed by t - 1, so `x_t` for the same (x0, t, eps) is the same on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("vp", "ve")


def vp_alpha_bar(T: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), betas linear from beta_min to beta_max over T steps."""
    betas = torch.linspace(beta_min, beta_max, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ve_sigmas(T: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras schedule sigma_t, t = 1..T; rho = inf gives the geometric sequence of the VE SDE."""
    frac = torch.arange(T, dtype=torch.float64) / max(T - 1, 1)
    if math.isinf(rho):
        return sigma_min * (sigma_max / sigma_min) ** frac
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + frac * (hi - lo)) ** rho


def _check(name: str, ok: bool, value: object, need: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {value!r} {need}")


@dataclass(frozen=True)
class Diffusion:
    """A VP or VE noise process with the uDDDM denoiser f = a(sigma_t) x_t + b(sigma_t) F."""

    kind: str
    T: int
    beta_min: float = 1.5e-3
    beta_max: float = 2.0e-2
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        _check("kind", self.kind in KINDS, self.kind, f"is not one of {KINDS}")
        _check("T", isinstance(self.T, int) and self.T >= 2, self.T, "must be an integer >= 2")
        if self.kind == "vp":
            _check("beta_min", 0 < self.beta_min < 1, self.beta_min, "must lie in (0, 1)")
            _check("beta_max", 0 < self.beta_max < 1, self.beta_max, "must lie in (0, 1)")
            _check("beta_max", self.beta_max >= self.beta_min, self.beta_max,
                   f"must be >= beta_min ({self.beta_min})")
        else:
            _check("sigma_min", self.sigma_min > 0, self.sigma_min, "must be > 0")
            _check("sigma_min", self.sigma_min < self.sigma_max, self.sigma_min,
                   f"must be < sigma_max ({self.sigma_max})")
            _check("rho", self.rho > 0, self.rho, "must be > 0 (inf for the geometric schedule)")
        # Cached schedule; object.__setattr__ because the dataclass is frozen.
        if self.kind == "vp":
            object.__setattr__(self, "_alpha_bar", vp_alpha_bar(self.T, self.beta_min, self.beta_max))
        else:
            object.__setattr__(self, "_sigma", ve_sigmas(self.T, self.sigma_min, self.sigma_max, self.rho))

    # -- schedule lookups, each returning float32 of shape (B, 1, 1, 1) on t's device --
    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        values = table.to(t.device)[t.long() - 1]
        return values.float().view(-1, 1, 1, 1)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind != "vp":
            raise ValueError("alpha_bar is defined for the VP process only")
        return self._at(self._alpha_bar, t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of x_t: sigma_t for VE, sqrt(1 - alpha_bar_t) for VP."""
        if self.kind == "ve":
            return self._at(self._sigma, t)
        return self._at((1.0 - self._alpha_bar).sqrt(), t)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Forward process: VP sqrt(ab) x0 + sqrt(1 - ab) eps; VE x0 + sigma_t eps (sigma, not sigma^2)."""
        if self.kind == "vp":
            ab = self.alpha_bar(t)
            return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
        return x0 + self.sigma(t) * eps

    def prior(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T for sampling from standard normal noise: VE scales it by sigma_max."""
        return noise * self.sigma_max if self.kind == "ve" else noise

    def skip_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of f = a x_t + b F: VP (1, -1); VE (kappa, 1 - kappa), kappa = sigma_min / sigma_t."""
        if self.kind == "vp":
            one = torch.ones(t.shape[0], 1, 1, 1, device=t.device)
            return one, -one
        kappa = self.sigma_min / self.sigma(t)
        return kappa, 1.0 - kappa

    def input_scale(self, t: torch.Tensor) -> torch.Tensor:
        """Scale applied to x_t before the network sees it, part of F_theta's own preconditioning:
        VE inputs reach sigma_max (50) in magnitude, so they are brought to unit variance
        (sigma_data = 0.5 as in EDM); VP inputs already have unit variance."""
        if self.kind == "vp":
            return torch.ones(t.shape[0], 1, 1, 1, device=t.device)
        return 1.0 / (self.sigma(t) ** 2 + 0.25).sqrt()

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: (t - 1) / (T - 1) in [0, 1]."""
        return (t.float() - 1.0) / (self.T - 1)

    def denoise(self, net, x0_est: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f_theta(x0_est, x_t, t) = a(sigma_t) x_t + b(sigma_t) F_theta(x0_est, x_t, t)."""
        a, b = self.skip_coefficients(t)
        F = net(x0_est, x_t * self.input_scale(t), self.noise_label(t))
        return a * x_t + b * F.to(x_t.dtype)
