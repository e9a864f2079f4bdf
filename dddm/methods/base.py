"""The interface every training method implements: one objective and its sampler.

The training loop, the x0 store, checkpoints, tracking, the sample and score stages are shared;
a method says what the network sees (`conditioning`), how one batch is turned into a loss, and
how a batch of samples is generated from per-index noise (so samples do not depend on the batch
size or the device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from pydantic import Field, PositiveInt

from .. import performance
from ..schema import Section


@dataclass(frozen=True)
class Progress:
    """Where training stands when a batch is drawn: schedules of the methods are keyed by it."""

    epoch: int        # n, counted from 0
    step: int         # optimizer steps already taken (0-based index of this step)
    total_steps: int  # of the whole run


@dataclass
class LossOutput:
    total: torch.Tensor                   # scalar, differentiable
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)  # logged, named by `Method.terms`
    new_estimates: torch.Tensor | None = None  # what the x0 store keeps for the batch (store methods only)


class SamplerConfig(Section):
    steps: tuple[PositiveInt, ...] = Field(min_length=1)  # sample with each of these step counts


class Method(ABC):
    """One training objective with its sampler. Subclasses define `name`, `Config` (their training
    params, `method.<name>`), `SamplerConfig` (their sampling params, `sampler.<name>`) and the
    abstract methods. Sampling params are apart so that changing them never retrains."""

    name: str
    Config: type[Section]
    SamplerConfig: type[SamplerConfig] = SamplerConfig
    uses_store = False  # keeps a per-sample x0 estimate across training (the store is opened only then)
    terms: tuple[str, ...] = ()  # the names of LossOutput.terms, in log order
    starts_from: tuple[str, ...] = ()  # the methods whose models it can be fine-tuned from (finetune.init_from)
    distills_from: tuple[str, ...] = ()  # the methods whose models it can learn from as a teacher (finetune.teacher)

    def __init__(self, cfg: Section, sampler: SamplerConfig, seed: int):
        self.cfg = cfg
        self.sampler = sampler
        self.seed = seed

    @property
    def conditioning(self) -> str:
        """How the network takes an x0 estimate: 'none' for methods without one."""
        return "none"

    def make_optimizer(self, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
        """Adam (fused where PyTorch has the kernel): every method's optimizer unless its paper says otherwise."""
        return performance.adam(params, lr, device)

    def begin_training(self, net: torch.nn.Module, teacher=None) -> None:
        """Before the first step, with the network to train (its initial weights loaded) and, for a method that
        distills, the teacher (a dddm.checkpoint.TrainedModel on the training device): the networks the loss
        uses besides the one trained."""

    def end_step(self, net: torch.nn.Module) -> None:
        """After each optimizer step (a target network's moving average)."""

    def training_state(self) -> dict:
        """What a checkpoint keeps of the method besides the network, its EMA and the optimizer."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore `training_state()` from a checkpoint (after `begin_training`)."""

    @abstractmethod
    def loss(self, net, x0: torch.Tensor, indices: torch.Tensor, progress: Progress,
             estimates: torch.Tensor | None = None) -> LossOutput:
        """The loss of one batch of clean images x0 (dataset indices `indices`)."""

    @abstractmethod
    def generate(self, net, indices: torch.Tensor, shape: tuple[int, ...], steps: int,
                 device: torch.device | str) -> torch.Tensor:
        """Samples for these sample indices in [-1, 1], on `device`; noise keyed by (seed, index)."""

    @abstractmethod
    def evaluations(self, steps: int) -> int:
        """Network evaluations per sample for a `steps`-step sample."""
