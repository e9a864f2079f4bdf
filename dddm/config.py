"""The schema of params.yaml, validated once at stage start.

Every error names the key (`model.channel_mult`, ...) and the offending value, so a bad
parameter stops a stage before any heavy work.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from .diffusion import Diffusion
from .losses import PAPER_HUBER_C


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["digits", "cifar10", "folder"]
    path: str | None  # local path or fsspec URL, for cifar10 and folder
    image_size: int = Field(ge=8)


class ModelConfig(_Section):
    base_channels: int = Field(ge=1)
    channel_mult: tuple[PositiveInt, ...] = Field(min_length=1)
    num_blocks: int = Field(ge=1)
    attn_resolutions: tuple[PositiveInt, ...]
    dropout: float = Field(ge=0.0, lt=1.0)
    num_heads: int = Field(ge=1)
    conditioning: Literal["cross_attention", "concat"]


class VPConfig(_Section):
    T: int = Field(ge=2)
    beta_min: float = Field(gt=0.0, lt=1.0)
    beta_max: float = Field(gt=0.0, lt=1.0)


class VEConfig(_Section):
    T: int = Field(ge=2)
    sigma_min: float = Field(gt=0.0)
    sigma_max: float = Field(gt=0.0)
    rho: float = Field(gt=0.0)  # .inf: the geometric schedule


class DiffusionConfig(_Section):
    kind: Literal["vp", "ve"]
    vp: VPConfig
    ve: VEConfig


class LossConfig(_Section):
    metric: Literal["pseudo_huber", "l2", "l1"]
    huber_c: float | None = Field(gt=0.0)  # null: the paper's c for the diffusion kind


class TrainConfig(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # per process
    lr: float = Field(gt=0.0)
    warmup_steps: int = Field(ge=0)  # linear lr warm-up; 0 = none
    grad_clip: float | None = Field(gt=0.0)  # max gradient norm; null = no clipping
    ema_decay: float = Field(ge=0.0, lt=1.0)
    bf16: bool  # bf16 autocast, on CUDA only
    device: Literal["auto", "cpu", "cuda"]
    nproc: int = Field(ge=1)  # processes per node (torchrun --nproc_per_node)
    checkpoint_every: int = Field(ge=0)  # steps; 0 = only where the store needs one and at the end
    checkpoint_dir: str  # runs live in <checkpoint_dir>/<hash of the training configuration>
    keep_checkpoints: int = Field(ge=1)  # the newest K checkpoints are kept; resume falls back to older ones
    resume: Literal["auto", "never"]


class StoreConfig(_Section):
    policy: Literal["auto", "device", "arrow"]
    dtype: Literal["float32", "float16", "bfloat16"]
    directory: str | None  # local directory for Arrow store files; null = inside the run's checkpoint dir
    budget_fraction: float = Field(gt=0.0, le=1.0)  # of free GPU memory / available RAM, for auto


class SampleConfig(_Section):
    steps: tuple[PositiveInt, ...] = Field(min_length=1)
    num_samples: int = Field(ge=1)
    batch_size: int = Field(ge=1)


class ScoreConfig(_Section):
    classifier_epochs: int = Field(ge=1)  # the offline fallback's feature network, trained in prepare
    inception_weights: str | None  # weights-inception-2015-12-05-6726825d.pth: path or fsspec URL; null = hub cache
    use_inception: Literal["auto", "always", "never"]  # auto: when the weights are found
    batch_size: int = Field(ge=1)
    untrained_baseline: bool  # also score the untrained network's 1-step samples, for comparison

    @property
    def inception_required(self) -> bool | None:
        return {"auto": None, "always": True, "never": False}[self.use_inception]


class TrackingConfig(_Section):
    experiment: str = Field(min_length=1)  # MLflow experiment name
    grid_every_epochs: int = Field(ge=0)  # EMA sample grids (1 and 2 steps) as artifacts; 0 = none


class Config(_Section):
    """All of params.yaml. No defaults here: params.yaml is the one source of values."""

    seed: int = Field(ge=0)
    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    loss: LossConfig
    train: TrainConfig
    store: StoreConfig
    sample: SampleConfig
    score: ScoreConfig
    tracking: TrackingConfig

    def make_diffusion(self) -> Diffusion:
        d = self.diffusion
        if d.kind == "vp":
            return Diffusion("vp", d.vp.T, beta_min=d.vp.beta_min, beta_max=d.vp.beta_max)
        return Diffusion("ve", d.ve.T, sigma_min=d.ve.sigma_min, sigma_max=d.ve.sigma_max, rho=d.ve.rho)

    @property
    def huber_c(self) -> float:
        return self.loss.huber_c if self.loss.huber_c is not None else PAPER_HUBER_C[self.diffusion.kind]


def _check_consistency(cfg: Config) -> None:
    """Rules that span several keys; each error names the key to change."""
    m, size = cfg.model, cfg.data.image_size
    factor = 2 ** (len(m.channel_mult) - 1)
    if size % factor:
        raise ConfigError(f"data.image_size: {size} is not divisible by {factor}, the U-Net's downsampling "
                          f"factor for model.channel_mult of length {len(m.channel_mult)}")
    reachable = [size // 2**i for i in range(len(m.channel_mult))]
    bad = [r for r in m.attn_resolutions if r not in reachable]
    if bad:
        raise ConfigError(f"model.attn_resolutions: {bad} never occur in the U-Net; it reaches {reachable}")
    for r in m.attn_resolutions:
        width = m.base_channels * m.channel_mult[reachable.index(r)]
        if width % m.num_heads:
            raise ConfigError(f"model.num_heads: {m.num_heads} does not divide {width}, the channel count "
                              f"at attention resolution {r}")
    ve = cfg.diffusion.ve
    if ve.sigma_min >= ve.sigma_max:
        raise ConfigError(f"diffusion.ve.sigma_min: {ve.sigma_min} must be < diffusion.ve.sigma_max ({ve.sigma_max})")
    vp = cfg.diffusion.vp
    if vp.beta_min > vp.beta_max:
        raise ConfigError(f"diffusion.vp.beta_min: {vp.beta_min} must be <= diffusion.vp.beta_max ({vp.beta_max})")
    if cfg.data.source != "digits" and not cfg.data.path:
        raise ConfigError(f"data.path: required for data.source={cfg.data.source!r} (a local path or fsspec URL)")
    if not math.isfinite(cfg.train.lr):
        raise ConfigError(f"train.lr: {cfg.train.lr} must be finite")


def _format(error: ValidationError, source: str) -> str:
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"])
        shown = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def merge_params(base: dict, overrides: dict) -> dict:
    """A copy of `base` with the nested `overrides` laid over it (presets, test configurations)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_params(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_config(raw: dict, source: str = "params") -> Config:
    """Validate a params mapping (as read from params.yaml) into a Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
    try:
        _check_consistency(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return parse_config(raw, str(path))
