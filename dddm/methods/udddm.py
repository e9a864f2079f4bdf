"""uDDDM (Algorithms 1 and 2 of the uDDDM paper): f_theta(x0_est, x_t, t) refines each training
sample's previous estimate; sampling iterates f at t = T from a noise estimate.

Two switches let the readings of the method be compared (defaults: the paper):
- `estimates_from`: what the store keeps after a visit, `prediction` (the paper: f's output) or
  `data` (the authors' released code writes the clean batch, train_util.py `update_xbar(micro, ...)`);
- `n_counts`: the n of w = 1 / (n + 1), `epoch` (the paper's text) or `step` (Algorithm 1's
  literal n <- n + 1 per iteration).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ..losses import metric_fn, udddm_loss
from ..processes import PROCESSES, NoiseProcess
from ..rng import (STREAM_SAMPLE_ESTIMATE, STREAM_SAMPLE_PRIOR, STREAM_TRAIN_NOISE, normal_per_index,
                   timestep_and_noise_per_index)
from ..schema import Section, check_choice, registry_section
from .base import LossOutput, Method, Progress


class StoreConfig(Section):
    policy: Literal["auto", "device", "arrow"]
    dtype: Literal["float32", "float16", "bfloat16"]
    directory: str | None  # local directory for Arrow store files; null = inside the run's checkpoint dir
    budget_fraction: float = Field(gt=0.0, le=1.0)  # of free GPU memory / available RAM, for auto


ProcessesConfig = registry_section("ProcessesConfig", PROCESSES)


class UDDDM(Method):
    name = "udddm"
    uses_store = True
    terms = ("guide", "iterative", "weight")
    # a study point (finetune.init_from): the shared U-Net weights of a denoiser, the estimate's input at zero
    starts_from = ("edm", "ict", "ect", "udddm")

    class Config(Section):
        process: str  # a key of dddm.processes.PROCESSES
        processes: ProcessesConfig
        conditioning: Literal["cross_attention", "concat"]
        metric: Literal["pseudo_huber", "l2", "l1"]
        huber_c: float | None = Field(gt=0.0)  # null: the paper's c for the process
        estimates_from: Literal["prediction", "data"]
        n_counts: Literal["epoch", "step"]
        store: StoreConfig

        @field_validator("process")
        @classmethod
        def _known_process(cls, v: str) -> str:
            return check_choice("process", v, PROCESSES)

    def __init__(self, cfg: Config, sampler, seed: int):
        super().__init__(cfg, sampler, seed)
        self.process: NoiseProcess = PROCESSES[cfg.process](getattr(cfg.processes, cfg.process))
        self.huber_c = cfg.huber_c if cfg.huber_c is not None else self.process.paper_huber_c
        self.metric = metric_fn(cfg.metric, self.huber_c)

    @property
    def conditioning(self) -> str:
        return self.cfg.conditioning

    def loss(self, net, x0, indices, progress: Progress, estimates=None) -> LossOutput:
        """Noise x0 with t ~ U{1..T} and eps ~ N(0, I) drawn per (seed, epoch, dataset index), so a
        sample's noise does not depend on which process or batch it lands in; predict with f_theta
        conditioned on the previous estimate; L = w d(pred, x0) + (1 - w) d(pred, x0_est)."""
        t, eps = timestep_and_noise_per_index(indices.cpu(), tuple(x0.shape[1:]), self.process.T,
                                              self.seed, STREAM_TRAIN_NOISE, progress.epoch)
        t, eps = t.to(x0.device), eps.to(x0.device)
        x_t = self.process.add_noise(x0, t, eps)
        pred = self.process.denoise(net, estimates, x_t, t)
        n = progress.epoch if self.cfg.n_counts == "epoch" else progress.step
        terms = udddm_loss(pred, x0, estimates, n, self.metric)
        kept = pred if self.cfg.estimates_from == "prediction" else x0
        return LossOutput(total=terms.total,
                          terms={"guide": terms.guide, "iterative": terms.iterative, "weight": terms.weight},
                          new_estimates=kept.detach())

    def iterate(self, net, x0_est: torch.Tensor, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        """Algorithm 2: x0_est <- f_theta(x0_est, x_T, T), `steps` times, the same x_T and t = T each time."""
        t = torch.full((x_T.shape[0],), self.process.T, dtype=torch.long, device=x_T.device)
        for _ in range(steps):
            x0_est = self.process.denoise(net, x0_est, x_T, t)
        return x0_est

    def initial_noise(self, indices, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_est, x_T) of sample i, drawn from (seed, i): a noise estimate and the prior."""
        x0_est = normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_ESTIMATE).to(device)
        x_T = self.process.prior(normal_per_index(indices, shape, self.seed, STREAM_SAMPLE_PRIOR).to(device))
        return x0_est, x_T

    def generate(self, net, indices, shape, steps, device):
        x0_est, x_T = self.initial_noise(indices, shape, device)
        return self.iterate(net, x0_est, x_T, steps).clamp(-1.0, 1.0)

    def evaluations(self, steps: int) -> int:
        return steps
