"""The schema of params.yaml, validated once at stage start (and first of all by the check stage).

Every error names the key (`model.channel_mult`, ...) and the offending value, so a bad parameter
stops the pipeline before any stage removes an output. Sections with variants are built from
their registries (dddm.methods.METHODS, dddm.processes.PROCESSES): no choice list is written twice.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator

from .data import SOURCES
from .methods import METHODS, Method
from .schema import Section, check_choice, registry_section
from .unet import check_architecture


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


class DataConfig(Section):
    source: str  # a key of dddm.data.SOURCES
    path: str | None  # local path or fsspec URL, for the sources that read files
    image_size: int = Field(ge=8)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return check_choice("source", v, dict.fromkeys(SOURCES))


class ModelConfig(Section):
    """The U-Net every method trains; how it takes an x0 estimate is the method's (`conditioning`)."""

    base_channels: int = Field(ge=1)
    channel_mult: tuple[PositiveInt, ...] = Field(min_length=1)
    num_blocks: int = Field(ge=1)
    attn_resolutions: tuple[PositiveInt, ...]
    dropout: float = Field(ge=0.0, lt=1.0)
    num_heads: int = Field(ge=1)


MethodConfig = registry_section("MethodConfig", METHODS)
SamplerSection = registry_section("SamplerSection", METHODS, "SamplerConfig")


class TrainConfig(Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # per process
    lr: float = Field(gt=0.0, allow_inf_nan=False)
    warmup_steps: int = Field(ge=0)  # linear lr warm-up; 0 = none
    grad_clip: float | None = Field(gt=0.0)  # max gradient norm; null = no clipping
    ema_decay: float = Field(ge=0.0, lt=1.0)
    bf16: bool  # bf16 autocast on CUDA
    cpu_bf16: bool  # bf16 autocast on CPUs with native bf16 (dddm/performance.py: faster only at larger widths)
    compile: bool  # torch.compile the network
    device: Literal["auto", "cpu", "cuda"]
    nproc: int = Field(ge=1)  # processes per node (torchrun --nproc_per_node)
    nnodes: int = Field(ge=1)  # machines; above 1 torchrun meets the others through `rendezvous`
    # intra-op threads per process (part of a run's identity: CPU sums depend on it); auto: dddm.distributed
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=4096)]
    log_every: int = Field(ge=1)  # steps per read of the loss to the host (one device sync); also at epoch ends
    checkpoint_every: int = Field(ge=0)  # steps; 0 = only where the store needs one and at the end
    checkpoint_dir: str = Field(min_length=1)  # runs live in <checkpoint_dir>/<hash of the training configuration>
    keep_checkpoints: int = Field(ge=1)  # the newest K checkpoints are kept; resume falls back to older ones
    resume: Literal["auto", "never"]
    eval_every: int = Field(ge=0)  # epochs between learning-curve points of the EMA model, and one at the end; 0 = none
    eval_samples: int = Field(ge=2)  # samples per learning-curve point

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc


class FinetuneConfig(Section):
    """Methods trained from another model's weights rather than from scratch (dvc.yaml's finetune stages)."""

    methods: tuple[str, ...]  # may be empty
    init_from: str | None  # a model file: a train stage's (out/train/<method>/model.pt, a DVC dependency) or any
    epochs: int = Field(ge=1)  # the fine-tuning's own budget, after the initialisation's
    lr: float = Field(gt=0.0, allow_inf_nan=False)


class RendezvousConfig(Section):
    """Where several nodes' torchrun agents meet (torchrun's c10d backend); unused with train.nnodes: 1.
    Not part of a run's identity: moving the rendezvous neither retrains nor restarts a run."""

    endpoint: str | None  # host:port that every node reaches; the node whose address it is hosts the store
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # shared by the nodes of one run; the method is appended
    timeout: int = Field(ge=1)  # seconds to wait for every node to arrive

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, _, port = v.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{v!r} is not host:port (for example node0.cluster:29500)")
        return v


class SampleConfig(Section):
    num_samples: int = Field(ge=1)
    batch_size: int = Field(ge=1)


class ScoreConfig(Section):
    classifier_epochs: int = Field(ge=1)  # the offline fallback's feature network, trained in the classifier stage
    inception_weights: str | None  # weights-inception-2015-12-05-6726825d.pth: path or fsspec URL; null = hub cache
    use_inception: Literal["auto", "always", "never"]  # auto: when the weights are found
    batch_size: int = Field(ge=1)
    untrained_baseline: bool  # also score the untrained network's 1-step samples, for comparison

    @property
    def inception_required(self) -> bool | None:
        return {"auto": None, "always": True, "never": False}[self.use_inception]


class TrackingConfig(Section):
    experiment: str = Field(min_length=1)  # MLflow experiment name
    grid_every_epochs: int = Field(ge=0)  # EMA sample grids as artifacts; 0 = none
    register_models: bool  # the register stage: each method's model into the MLflow Model Registry


class LimitsConfig(Section):
    """What the check stage lets a run ask of this machine (dddm/limits.py)."""

    max_hours: float = Field(gt=0.0, allow_inf_nan=False)  # estimated training or sampling time per method
    machine: Literal["enforce", "ignore"]  # ignore: no memory, disk or time estimates (a bigger machine runs it)


class Config(Section):
    """All of params.yaml. No defaults here: params.yaml is the one source of values."""

    seed: int = Field(ge=0, le=2**32 - 1)  # numpy's and every generator's range
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
    if cfg.data.source != "digits" and not cfg.data.path:
        raise ConfigError(f"data.path: required for data.source={cfg.data.source!r} (a local path or fsspec URL)")
    _check_finetune(cfg)


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
    if ft.methods and not ft.init_from:
        raise ConfigError(f"finetune.init_from: required to fine-tune {', '.join(ft.methods)} (a model file, e.g. "
                          f"out/train/edm/model.pt)")


def _format(error: ValidationError, source: str) -> str:
    lines = []
    for e in error.errors():
        loc = tuple(str(p) for p in e["loc"])
        # a validator's own message (pydantic prefixes "Value error, "), with the value unless it names it
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
        shown = "" if e["type"] == "missing" or repr(e["input"]) in msg else f" (got {e['input']!r})"
        if e["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "method" and loc[1] in METHODS \
                and loc[2] == "store" and not METHODS[loc[1]].uses_store:
            msg = f"the x0 store is unused by {loc[1]} (only methods that keep per-sample estimates have one)"
        lines.append(f"{source}: {'.'.join(loc)}: {msg}{shown}")
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
    """Validate a params mapping (as read from params.yaml) into a Config. Validation goes through
    JSON so types are strict the way YAML users expect: 3 is a valid float, `'3'` and `true` are not ints."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: a value is not plain YAML data ({e})") from None
    try:
        cfg = Config.model_validate_json(text)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
    try:
        _check_consistency(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def read_yaml(text: str, source: str):
    """`yaml.safe_load`, refusing anchors and aliases before anything expands them: a params file
    needs none, and nested aliases (9 levels of 10 make 10^9 values) grow to gigabytes in whatever
    expands them (json.dumps here, DVC's own reader)."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ConfigError(f"{source}: line {event.start_mark.line + 1}: YAML anchors and aliases (&name, "
                                  f"*name) are not accepted in a params file; write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    raw = read_yaml(path.read_text(), str(path)) or {}
    if isinstance(raw, dict) and "limits" not in raw:
        raise ConfigError(f"{path}: limits: Field required")
    return parse_config(raw, str(path))


