"""The schema of params.yaml, validated once at stage start (and first of all by the check stage).

Every error names the key (`model.channel_mult`, ...) and the offending value, so a bad parameter
stops the pipeline before any stage removes an output. Sections with variants are built from
their registries (dddm.methods.METHODS, dddm.processes.PROCESSES): no choice list is written twice.
"""

from __future__ import annotations

import copy
from pathlib import Path

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, field_validator

from .methods import METHODS, Method
from .schema import Section, check_choice, registry_section
from .sections import (ConfigError, DataConfig, SampleConfig, ScoreConfig, Seed, TrainConfig, read_params,
                       validate)
from .unet import check_architecture


class ModelConfig(Section):
    """The U-Net every method trains; how it takes an x0 estimate is the method's (`conditioning`)."""

    base_channels: int = Field(ge=1)
    channel_mult: tuple[PositiveInt, ...] = Field(min_length=1)
    num_blocks: int = Field(ge=1)
    attn_resolutions: tuple[PositiveInt, ...]
    dropout: float = Field(ge=0.0, lt=1.0)
    num_heads: int = Field(ge=1)


class FinetuneConfig(Section):
    """Methods trained from another model's weights rather than from scratch (dvc.yaml's finetune stages)."""

    methods: tuple[str, ...]  # may be empty
    init_from: str | None  # a model file: a train stage's (out/train/<method>/model.pt, a DVC dependency) or any
    epochs: int = Field(ge=1)  # the fine-tuning's own budget, after the initialisation's
    lr: float = Field(gt=0.0)
    # the network's dropout while fine-tuning, per method (iCT: 0.3 best on CIFAR-10; cm's CD runs: 0); a method
    # not listed trains at model.dropout
    dropout: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]]
    teacher: str = Field(min_length=1)  # the model a distilling method (CD) learns from; a DVC dependency of the
    # finetune stages, like init_from


class RendezvousConfig(Section):
    """Where several nodes' torchrun agents meet (torchrun's c10d backend; the endpoint and id are unused with
    train.nnodes: 1), and how long the training processes wait for each other (`timeout`, also with one node and
    several processes). Not part of a run's identity: moving the rendezvous neither retrains nor restarts a run."""

    endpoint: str | None  # host:port that every node reaches; the node whose address it is hosts the store
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # shared by the nodes of one run; the method is appended
    # seconds to wait for every node to arrive, and for every rank in a collective (a stopped or lost rank)
    timeout: int = Field(ge=1)

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, _, port = v.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{v!r} is not host:port (for example node0.cluster:29500)")
        return v


class TrackingConfig(Section):
    experiment: str = Field(min_length=1, max_length=500)  # MLflow experiment name (MLflow takes at most 500)
    grid_every_epochs: int = Field(ge=0)  # EMA sample grids as artifacts; 0 = none
    register_models: bool  # the register stage: each method's model into the MLflow Model Registry
    # each training run's EMA network as an MLflow model (pt2: about 5 s of a tiny train stage, more for larger
    # networks); false: none, and nothing to register. params.yaml must have it (load_config); a model file
    # written before it existed has not, and logged its model
    log_model: bool = True


class LimitsConfig(Section):
    """What the check stage lets a run ask of this machine (dddm/limits.py)."""

    max_hours: float = Field(gt=0.0)  # estimated training or sampling time per method
    machine: Literal["enforce", "ignore"]  # ignore: no memory, disk or time estimates (a bigger machine runs it)


MethodConfig = registry_section("MethodConfig", METHODS)
SamplerSection = registry_section("SamplerSection", METHODS, "SamplerConfig")


class Config(Section):
    """All of params.yaml. No defaults here: params.yaml is the one source of values."""

    seed: Seed
    data: DataConfig
    model: ModelConfig
    methods: tuple[str, ...] = Field(min_length=1)  # trained, sampled and scored side by side (dvc.yaml matrix)
    method: MethodConfig
    train: TrainConfig
    finetune: FinetuneConfig
    rendezvous: RendezvousConfig
    sampler: SamplerSection  # each method's sampling params: changing them resamples, never retrains
    sample: SampleConfig
    score: ScoreConfig
    tracking: TrackingConfig
    # params.yaml must have it (load_config); a model file written before it existed has not, and needs none
    limits: LimitsConfig | None = None

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            check_choice("methods", name, METHODS)
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)} names a method twice")
        return v

    @property
    def compared(self) -> tuple[str, ...]:
        """Every method trained, sampled and scored: from scratch (`methods`), then fine-tuned."""
        return self.methods + self.finetune.methods

    def finetuned(self, name: str) -> bool:
        return name in self.finetune.methods

    def epochs_of(self, name: str) -> int:
        return self.finetune.epochs if self.finetuned(name) else self.train.epochs

    def lr_of(self, name: str) -> float:
        return self.finetune.lr if self.finetuned(name) else self.train.lr

    def network_of(self, name: str) -> ModelConfig:
        """The U-Net `name` trains, with the dropout it trains at (`finetune.dropout` for a fine-tuned method)."""
        if self.finetuned(name) and name in self.finetune.dropout:
            return self.model.model_copy(update={"dropout": self.finetune.dropout[name]})
        return self.model

    def method_config(self, name: str) -> Section:
        check_choice("method", name, METHODS)
        return getattr(self.method, name)

    def make_method(self, name: str, sampler: Section | None = None, seed: int | None = None) -> Method:
        """The method `name` with its sections `method.<name>` and `sampler.<name>` (or `sampler`, `seed`)."""
        check_choice("method", name, METHODS)
        try:
            return METHODS[name](self.method_config(name), sampler or getattr(self.sampler, name),
                                 self.seed if seed is None else seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_consistency(cfg: Config) -> None:
    """Rules that span several sections; each error names the key to change."""
    m = cfg.model
    try:
        check_architecture(cfg.data.image_size, m.base_channels, m.channel_mult, m.attn_resolutions, m.num_heads)
    except ValueError as e:
        key = str(e).split(":", 1)[0]
        raise ConfigError(f"{'data' if key == 'image_size' else 'model'}.{e}") from None
    for name in METHODS:
        cfg.make_method(name)  # rules across a method's training and sampling sections
    if cfg.train.nnodes > 1 and cfg.rendezvous.endpoint is None:
        raise ConfigError(f"rendezvous.endpoint: required with train.nnodes={cfg.train.nnodes} "
                          "(host:port of the node whose agent hosts the rendezvous, reachable from every node)")
    cfg.data.check_path()
    _check_finetune(cfg)
    if cfg.tracking.register_models and not cfg.tracking.log_model:
        raise ConfigError("tracking.register_models: true registers each training run's logged model; with "
                          "tracking.log_model: false there is none (set register_models: false, or log_model: true)")


def _check_finetune(cfg: Config) -> None:
    ft = cfg.finetune
    for name in ft.methods:
        try:
            check_choice("finetune.methods", name, METHODS)
        except ValueError as e:
            raise ConfigError(f"finetune.methods: {e}") from None
        if not METHODS[name].starts_from:
            raise ConfigError(f"finetune.methods: {name} cannot start from another model (it trains from scratch)")
    twice = sorted({n for n in ft.methods if ft.methods.count(n) > 1 or n in cfg.methods})
    if twice:
        raise ConfigError(f"finetune.methods: {', '.join(twice)} listed twice (in methods or finetune.methods); "
                          f"a method is trained either from scratch or fine-tuned")
    scratch = [name for name in cfg.methods if METHODS[name].distills_from]
    if scratch:
        raise ConfigError(f"methods: {', '.join(scratch)} distil a teacher model (finetune.teacher): list them in "
                          f"finetune.methods")
    for name in ft.dropout:  # (a method not fine-tuned now may be listed: unused until it is)
        try:
            check_choice("finetune.dropout", name, METHODS)
        except ValueError as e:
            raise ConfigError(f"finetune.dropout: {e}") from None
    if ft.methods and not ft.init_from:
        raise ConfigError(f"finetune.init_from: required to fine-tune {', '.join(ft.methods)} (a model file, e.g. "
                          f"out/train/edm/model.pt)")


def merge_params(base: dict, overrides: dict) -> dict:
    """A copy of `base` with the nested `overrides` laid over it (presets, test configurations)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_params(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unused_store(loc: tuple[str, ...]) -> str | None:
    if len(loc) == 3 and loc[0] == "method" and loc[1] in METHODS and loc[2] == "store" \
            and not METHODS[loc[1]].uses_store:
        return f"the x0 store is unused by {loc[1]} (only methods that keep per-sample estimates have one)"
    return None


def parse_config(raw: dict, source: str = "params") -> Config:
    """Validate a params mapping (as read from params.yaml) into a Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = validate(raw, Config, source, _unused_store)
    try:
        _check_consistency(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


# keys params.yaml must have that the params stored in an older model file lack (their defaults are what such a
# file's run did)
REQUIRED_IN_PARAMS = ("limits", "tracking.log_model")


def load_config(path: str | Path = "params.yaml") -> Config:
    raw = read_params(path)
    for key in REQUIRED_IN_PARAMS:
        section, _, name = key.partition(".")
        if section not in raw or (name and isinstance(raw[section], dict) and name not in raw[section]):
            raise ConfigError(f"{path}: {key}: Field required")
    return parse_config(raw, str(path))
