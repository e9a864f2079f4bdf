"""ECT (Geng et al. 2024, "Consistency Models Made Easy"): consistency training that starts from a
trained denoiser (here the EDM stage's model, `finetune.init_from`) and shrinks the gap between the two
noise levels of the consistency condition in stages, from the denoising loss towards consistency.

Checked against locuslab/ect: `training/loss.py` (ECMLoss, adj='sigmoid'), `training/networks.py`
(ECMPrecond), `training/ct_training_loop.py` (stage = tick // double_ticks, `generator_fn`), `run_ecm.sh`
(RAdam, lr 1e-4). What follows that code exactly:
- t ~ lognormal(P_mean, P_std); r = max(0, t (1 - n(t) / q^(stage + 1))), n(t) = 1 + k sigmoid(-b t);
  r = 0 makes the target the clean image (the denoising loss of the first stage's small t);
- x_t = y + t eps, x_r = y + r eps with one eps, the target f(x_r, r) from the current weights without
  gradient and with the student's dropout mask (the RNG state is restored before the target's call);
- loss sqrt(||f(x_t, t) - target||^2 + c^2) - c, divided by (t - r); c = 0 by default (the L2 norm);
- the preconditioning: ECMPrecond in training mode is EDM's denoiser (c_skip, c_out without sigma_min),
  in eval mode the consistency boundary condition f(x, sigma_min) = x. The same here: `f_train` at
  training, `f` when sampling. So at step 0 the fine-tuned network is exactly the EDM denoiser it starts
  from, and the two forms differ by < 1% in c_skip for sigma >= 0.1 (sigma_min = 0.002, sigma_data = 0.5);
- sampling: x = f(t_max z, t_max), then x <- f(x + t_i z_i, t_i) for each mid t_i (0.821), no clamping
  between steps.
The stage length: ECT doubles q every `double` ticks over a fixed run; here the run is divided into
`stages` equal parts (ECT's CIFAR-10 run: 8 stages over 200k iterations, 25.6 Mimg / 12.8 kimg per tick / 250).
"""

from __future__ import annotations

import contextlib
import math

import torch
from pydantic import Field, PositiveInt, model_validator

from ..losses import pseudo_huber
from ..rng import STREAM_SAMPLE_PRIOR, STREAM_SAMPLE_STEP, STREAM_TRAIN_NOISE, normal_per_index, uniform_and_noise_per_index
from ..schema import Section
from .base import LossOutput, Method, Progress
from .edm import precondition
from .ict import ICT, check_mid_sigmas


def ect_stage(step: int, total_steps: int, stages: int) -> int:
    """The stage of training step `step` (0-based) of `total_steps`, divided into `stages` equal parts."""
    return min(step * stages // max(total_steps, 1), stages - 1)


def ect_r(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """r = max(0, t (1 - n(t) / q^(stage + 1))), n(t) = 1 + k sigmoid(-b t) (ECMLoss.t_to_r_sigmoid)."""
    n = 1.0 + k * torch.sigmoid(-b * t)
    return (t * (1.0 - n / q ** (stage + 1))).clamp(min=0.0)


@contextlib.contextmanager
def replayed_randomness(device: torch.device):
    """Put the random state back to where it was at the block's entry once it ends, so that the next
    network call draws the block's dropout mask again (ECT restores the CUDA RNG state the same way)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    yield
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class ECT(Method):
    name = "ect"
    terms = ("stage", "r_zero")
    starts_from = ("edm", "ict", "ect")  # models of the EDM preconditioning family, without an estimate input

    class Config(Section):
        sigma_min: float = Field(gt=0.0)   # the boundary condition of the sampler's f
        sigma_max: float = Field(gt=0.0)   # t of the first sampling step
        sigma_data: float = Field(gt=0.0)
        p_mean: float                      # t ~ lognormal(p_mean, p_std)
        p_std: float = Field(gt=0.0)
        q: float = Field(gt=1.0)           # the gap t - r shrinks by q each stage
        k: float = Field(ge=0.0)           # n(t) = 1 + k sigmoid(-b t)
        b: float
        stages: PositiveInt                # of the run (ECT's CIFAR-10 run: 8)
        huber_c: float = Field(ge=0.0)     # the pseudo-Huber c; 0 = the L2 norm (ECT's default)

        @model_validator(mode="after")
        def _consistent(self):
            if not self.sigma_min < self.sigma_max:
                raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
            return self

    SamplerConfig = ICT.SamplerConfig  # sigmas: t of step 2, 3, ... (ECT's two-step: 0.821)

    def __init__(self, cfg: Config, sampler: ICT.SamplerConfig, seed: int):
        super().__init__(cfg, sampler, seed)
        check_mid_sigmas(self.name, sampler.sigmas, cfg.sigma_min, cfg.sigma_max)

    def make_optimizer(self, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
        """RAdam, as ECT's runs (run_ecm.sh: --optim=RAdam)."""
        return torch.optim.RAdam(params, lr=lr)

    def f_train(self, net, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ECMPrecond in training mode: EDM's denoiser."""
        return precondition(net, x, sigma, self.cfg.sigma_data)

    def f(self, net, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ECMPrecond in eval mode: the consistency function, f(x, sigma_min) = x."""
        return precondition(net, x, sigma, self.cfg.sigma_data, self.cfg.sigma_min)

    def loss(self, net, x0, indices, progress: Progress, estimates=None) -> LossOutput:
        """d(f(y + t eps, t), sg f(y + r eps, r)) / (t - r), the target y where r = 0; t and eps drawn
        per (seed, epoch, index)."""
        c = self.cfg
        u, eps = uniform_and_noise_per_index(indices.cpu(), tuple(x0.shape[1:]), self.seed,
                                             STREAM_TRAIN_NOISE, progress.epoch)
        normal = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))
        t = (c.p_mean + c.p_std * normal).exp().float().view(-1, 1, 1, 1).to(x0.device)
        stage = ect_stage(progress.step, progress.total_steps, c.stages)
        r = ect_r(t, stage, c.q, c.k, c.b)
        eps = eps.to(x0.device)
        clean = r == 0
        with replayed_randomness(x0.device):
            student = self.f_train(net, x0 + t * eps, t)
        with torch.no_grad():
            target = self.f_train(net, x0 + r * eps, torch.where(clean, t, r))  # where r = 0, y replaces it
        target = torch.where(clean, x0, target.float())
        per_sample = pseudo_huber(student.float(), target, c.huber_c) / (t - r).flatten()
        return LossOutput(total=per_sample.mean(), terms={"stage": float(stage), "r_zero": clean.float().mean()})

    def generate(self, net, indices, shape, steps, device):
        c = self.cfg
        z = normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_PRIOR).to(device)
        sigma = torch.full((len(indices), 1, 1, 1), c.sigma_max, device=device)
        x = self.f(net, c.sigma_max * z, sigma)
        for k, tau in enumerate(self.sampler.sigmas[:steps - 1], start=1):
            z = normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_STEP, k).to(device)
            x = self.f(net, x + tau * z, torch.full_like(sigma, tau))
        return x.clamp(-1.0, 1.0)

    def evaluations(self, steps: int) -> int:
        return steps
