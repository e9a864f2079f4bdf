"""params.yaml read safely, and the sections the data stages read (`DataParams`: seed, data, train, sample,
score).

The data stages (prepare, classifier, reference) read only these, so that adding or changing a method or
another section (dddm/methods, dddm/config.py) reruns no data stage and keeps the scoring classifier: its
weights depend on the CPU that trains them. The whole file is validated by dddm.config (the check stage).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from .data import SOURCES
from .schema import Section, check_choice


MAX_PARAMS_CHARS = 1 << 20  # 1 MB of text; this project's params.yaml is 10 kB
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's and every generator's range


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

    def check_path(self) -> None:
        """A rule of the whole section (pydantic would report it without the key's name)."""
        if self.source != "digits" and not self.path:
            raise ConfigError(f"data.path: required for data.source={self.source!r} (a local path or fsspec URL)")


class TrainConfig(Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # per process
    lr: float = Field(gt=0.0)
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


SHOWN = 200  # characters of a refused value that an error shows
Explain = Callable[[tuple[str, ...]], "str | None"]  # an unknown key's location -> why it is unknown, if known


def format_errors(error: ValidationError, source: str, explain: Explain = lambda loc: None) -> str:
    lines = []
    for e in error.errors():
        loc = tuple(str(p) for p in e["loc"])
        # a validator's own message (pydantic prefixes "Value error, "), with the value unless it names it
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
        got = repr(e["input"])
        if len(got) > SHOWN:  # a value of megabytes would be the whole message
            got = f"{got[:SHOWN]}... ({len(got)} characters)"
        shown = "" if e["type"] == "missing" or repr(e["input"]) in msg else f" (got {got})"
        if e["type"] == "extra_forbidden":
            msg = explain(loc) or msg  # a key that is unknown for a reason the schema's owner can say
        lines.append(f"{source}: {'.'.join(loc)}: {msg}{shown}")
    return "\n".join(lines)


def read_yaml(text: str, source: str):
    """`yaml.safe_load`, refusing what DVC refuses or what would cost gigabytes in whatever reads the file
    (json.dumps here, DVC's own reader), before anything is built from it:
    - a text above MAX_PARAMS_CHARS (1 MB): parsing YAML takes about 20 times its size in memory (a 50 MB file
      took 1.1 GB);
    - anchors and aliases: a params file needs none, and nested aliases (9 levels of 10 make 10^9 values)
      grow to gigabytes;
    - a key given twice in one mapping: YAML keeps the last silently, DVC's reader refuses the file, after
      the check stage would have passed it."""
    if len(text) > MAX_PARAMS_CHARS:
        raise ConfigError(f"{source}: larger than {MAX_PARAMS_CHARS >> 20} MB, the most a params file may be "
                          f"(this project's is 10 kB); refused unparsed")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ConfigError(f"{source}: line {event.start_mark.line + 1}: YAML anchors and aliases (&name, "
                                  f"*name) are not accepted in a params file; write the values out")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            _refuse_duplicate_keys(node, source)
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:  # PyYAML's composer recurses per level: some thousand `[` exhaust Python's stack
        raise ConfigError(f"{source}: nested too deeply to be a params file") from None


def _refuse_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    todo = [((), root)]  # (key path, node); a tree, since aliases are refused first
    while todo:
        path, node = todo.pop()
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name in seen:
                    raise ConfigError(f"{source}: line {key.start_mark.line + 1}: {'.'.join((*path, name))} is "
                                      f"given twice (YAML would keep the last, DVC refuses the file); keep one")
                seen.add(name)
                todo.append(((*path, str(name)), value))
        elif isinstance(node, yaml.SequenceNode):
            todo += [((*path, str(i)), item) for i, item in enumerate(node.value)]


class DataParams(Section):
    """What the data stages read of params.yaml (the other sections are the check stage's to validate)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    seed: Seed
    data: DataConfig
    train: TrainConfig
    sample: SampleConfig
    score: ScoreConfig


def read_params(path: str | Path) -> dict:
    """params.yaml as a mapping of sections, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read(MAX_PARAMS_CHARS + 1)  # enough for read_yaml to refuse a larger file, without reading it all
    raw = read_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


Params = TypeVar("Params", bound=Section)


def validate(raw: dict, schema: type[Params], source: str, explain: Explain = lambda loc: None) -> Params:
    """Validate a params mapping through JSON, so types are strict the way YAML users expect: 3 is a valid
    float, `'3'` and `true` are not ints."""
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: a value is not plain YAML data ({e})") from None
    try:
        return schema.model_validate_json(text)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, explain)) from None


def load_data_params(path: str | Path = "params.yaml") -> DataParams:
    params = validate(read_params(path), DataParams, str(path))
    try:
        params.data.check_path()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return params
