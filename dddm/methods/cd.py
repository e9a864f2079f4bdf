"""CD (Song et al. 2023, "Consistency Models"): consistency distillation. The consistency condition is
enforced between two adjacent noise levels of Karras' discretisation, the nearer point found by one Heun step
of a trained diffusion model's probability-flow ODE (the teacher: here the EDM stage's model,
`finetune.teacher`), so the target carries no data-noise variance (iCT's and ECT's single-sample estimate does).

Checked against openai/consistency_models: `cm/karras_diffusion.py` (`consistency_losses` with a teacher,
its `heun_solver`, `get_scalings_for_boundary_condition`, `stochastic_iterative_sampler`), `scripts/cm_train.py`
(the student and the target network start from the teacher's weights; the teacher in eval mode) and
`scripts/launch.sh` (the ImageNet-64 cd_* runs: `--target_ema_mode fixed --start_ema 0.95 --scale_mode fixed
--start_scales 40 --weight_schedule uniform`, student dropout 0.0); and openai/consistency_models_cifar10
(`configs/cifar10_ve_cd.py`, `launch.sh`, `jcm/losses.py`: CIFAR-10's N 18, no target EMA, i.e. the online
weights under stop-gradient, dropout 0, RAdam 4e-4 for l2; presets/cifar10-cd.yaml). What follows that code
exactly:
- t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1 (descending);
  n uniform on 0..N-2; x = y + t_n z;
- x' = one Heun step of dx/dt = (x - D(x, t)) / t from t_n to t_{n+1}, D the teacher's denoiser;
- the student f(x, t_n) and the target f(x', t_{n+1}) from the target network (the student's moving average with
  decay mu; mu = 0: the student's own weights) without gradient, with the student's dropout mask (the RNG state
  is put back before the target's call);
- f the consistency parameterisation, f(x, sigma_min) = x (dddm.methods.edm.precondition with sigma_min);
- uniform weighting; metric `l2`: the squared difference's mean over pixels (cm's `l2`);
- sampling: iCT's (cm's stochastic_iterative_sampler): x = f(sigma_max z, sigma_max), then x <- f(x +
  sqrt(tau^2 - sigma_min^2) z, tau) for each mid tau, clamped to [-1, 1].
Departures, each a param: `metric: pseudo_huber` (iCT's; cm's CIFAR-10 and ImageNet results use LPIPS, whose
weights this project cannot download); the network's noise input is EDM's ln(t)/4, not cm's 250 ln(t), because
the student starts from the EDM stage's network (as ECT's does).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..losses import l2, pseudo_huber
from ..processes import karras_sigmas
from ..rng import STREAM_TRAIN_NOISE, uniform_and_noise_per_index
from ..schema import Section
from .base import LossOutput, Method, Progress
from .ect import replayed_randomness
from .edm import precondition
from .ict import ICT, check_mid_sigmas


def cd_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """t_0 = sigma_max > t_1 > ... > t_{N-1} = sigma_min (float64): cm's indexing."""
    return karras_sigmas(n, sigma_min, sigma_max, rho).flip(0)


def heun_step(denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One step of Heun's method on dx/dt = (x - D(x, t)) / t from t to t_next (cm's heun_solver; t > t_next > 0,
    shapes (B, 1, 1, 1))."""
    d = (x - denoiser(x, t)) / t
    euler = x + d * (t_next - t)
    d_next = (euler - denoiser(euler, t_next)) / t_next
    return x + (d + d_next) * (t_next - t) / 2


class CD(Method):
    name = "cd"
    terms = ("t_mean",)
    starts_from = ("edm", "cd")  # the student and its target start from the teacher's weights (cm_train.py)
    distills_from = ("edm",)     # a denoiser of the probability-flow ODE

    class Config(Section):
        sigma_min: float = Field(gt=0.0)   # the boundary condition f(x, sigma_min) = x
        sigma_max: float = Field(gt=0.0)
        sigma_data: float = Field(gt=0.0)  # the teacher's (EDM's 0.5)
        rho: float = Field(gt=0.0)
        N: int = Field(ge=2, le=10_000)  # levels of the discretisation (cm's CIFAR-10: 18; ImageNet-64: 40)
        # the target network's decay (CIFAR-10: 0, the online weights; ImageNet-64: 0.95)
        mu: float = Field(ge=0.0, lt=1.0)
        metric: Literal["l2", "pseudo_huber"]  # cm's l2 (the paper's best: LPIPS, not available here)
        huber_scale: float = Field(gt=0.0)  # pseudo_huber's c = huber_scale sqrt(dim) (iCT)

        @model_validator(mode="after")
        def _consistent(self):
            if not self.sigma_min < self.sigma_max:
                raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
            return self

    SamplerConfig = ICT.SamplerConfig  # sigmas: tau of step 2, 3, ...
    f = ICT.f                          # the consistency function, f(x, sigma_min) = x
    generate = ICT.generate            # cm's stochastic_iterative_sampler

    def __init__(self, cfg: Config, sampler: ICT.SamplerConfig, seed: int):
        super().__init__(cfg, sampler, seed)
        check_mid_sigmas(self.name, sampler.sigmas, cfg.sigma_min, cfg.sigma_max)
        self.teacher = None
        self.target: AveragedModel | None = None

    def make_optimizer(self, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
        """RAdam (cm/train_util.py)."""
        return torch.optim.RAdam(params, lr=lr)

    def begin_training(self, net, teacher=None) -> None:
        if teacher is None:
            raise ValueError("cd distills a teacher model (finetune.teacher); none was given")
        self.teacher = teacher
        if self.cfg.mu > 0:
            self.target = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.mu), use_buffers=True)
            self.target.n_averaged.fill_(1)  # theta^- starts as theta: the first update averages (AveragedModel copies)
            self.target.requires_grad_(False)
            self.target.train()  # the student's dropout, replayed (cm_train.py: target_model.train())

    def end_step(self, net) -> None:
        if self.target is not None:
            self.target.update_parameters(net)

    def training_state(self) -> dict:
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_training_state(self, state: dict) -> None:
        if self.target is not None:
            self.target.load_state_dict(state["target"])

    def teacher_denoiser(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return precondition(self.teacher.net, x, t, self.teacher.method.cfg.sigma_data).float()

    def loss(self, net, x0, indices, progress: Progress, estimates=None) -> LossOutput:
        """d(f(x_n, t_n), sg f^-(x', t_{n+1})), x_n = y + t_n z, x' the teacher's Heun step from x_n; n and z
        drawn per (seed, epoch, index)."""
        c = self.cfg
        u, z = uniform_and_noise_per_index(indices.cpu(), tuple(x0.shape[1:]), self.seed,
                                           STREAM_TRAIN_NOISE, progress.epoch)
        n = (u * (c.N - 1)).long().clamp(max=c.N - 2)  # uniform on 0..N-2
        sigmas = cd_sigmas(c.N, c.sigma_min, c.sigma_max, c.rho)
        t, t_next = (sigmas[j].float().view(-1, 1, 1, 1).to(x0.device) for j in (n, n + 1))
        x = x0 + t * z.to(x0.device)
        with replayed_randomness(x0.device):
            student = self.f(net, x, t)
        with torch.no_grad():
            x_next = heun_step(self.teacher_denoiser, x.float(), t, t_next)
            target = self.f(self.target if self.target is not None else net, x_next, t_next).float()
        if c.metric == "l2":
            per_sample = l2(student, target)
        else:
            per_sample = pseudo_huber(student, target, c.huber_scale * math.sqrt(x0[0].numel()))
        return LossOutput(total=per_sample.mean(), terms={"t_mean": t.mean()})

    def evaluations(self, steps: int) -> int:
        return steps
