"""Fine-tuning: a method's training starts from another model's weights (params `finetune`).

The model file is checked against what the fine-tuned method and params.yaml expect before any training:
its method family (`Method.starts_from`), image size and channels, and the U-Net's shape, each mismatch
named with the key, the file and both values. The weights are copied tensor by tensor; a network with an
estimate input (uDDDM) gets its new weights so that they add nothing at step 0: the cross-attention's
output projections at zero, or the concatenated estimate's input channels at zero. So at step 0 the
network computes what the source network computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import CheckpointError, TrainedModel, load_model
from .unet import CrossAttention

KEY = "finetune.init_from"
TEACHER_KEY = "finetune.teacher"
SHAPE_KEYS = ("base_channels", "channel_mult", "num_blocks", "attn_resolutions", "num_heads")


class InitialisationError(ValueError):
    """The model file to start from is missing, damaged or does not fit; the message names the key."""


@dataclass(frozen=True)
class Initialisation:
    path: str
    method: str    # the source model's method
    images: int    # training images behind the source model (its own initialisation's included)
    weights_sha256: str
    state_dict: dict

    def describe(self) -> dict:
        """What a fine-tuned model file records of where it started (the state dict aside)."""
        return {"path": self.path, "method": self.method, "images": self.images, "weights_sha256": self.weights_sha256}


def check_compatible(cfg, method, trained: TrainedModel, path: str, image_size: int, channels: int,
                     key: str = KEY) -> None:
    """Raise InitialisationError naming the first mismatch between the model file at `key` (the model to start
    from, or the teacher) and what `method` under `cfg` trains on images of `channels` x `image_size`^2."""
    source = trained.method.name
    role, families = ("starts from", method.starts_from) if key == KEY else ("distils", method.distills_from)
    if source not in families:
        raise InitialisationError(f"{key}: {path} holds a {source} model; {method.name} {role} a model of "
                                  f"{', '.join(families)}")
    have = (trained.dataset["channels"], trained.dataset["image_size"])
    if have != (channels, image_size):
        raise InitialisationError(f"{key}: {path} was trained on {have[0]}x{have[1]}x{have[1]} images; the prepared "
                                  f"dataset's are {channels}x{image_size}x{image_size}")
    for name in SHAPE_KEYS:
        theirs, ours = getattr(trained.cfg.model, name), getattr(cfg.model, name)
        if theirs != ours:
            raise InitialisationError(f"{key}: {path} has {name} {_shown(theirs)}, model.{name} is {_shown(ours)}")


def _shown(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _load_checked(cfg, method, image_size: int, channels: int, key: str) -> TrainedModel:
    path = cfg.finetune.init_from if key == KEY else cfg.finetune.teacher
    try:
        trained = load_model(path)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise InitialisationError(f"{key}: {e}") from None
    check_compatible(cfg, method, trained, path, image_size, channels, key)
    return trained


def describe_teacher(cfg, teacher: TrainedModel) -> dict:
    """What a model file and its MLflow run record of the model it distilled."""
    return {"path": cfg.finetune.teacher, "method": teacher.method.name, "images": teacher.images,
            "weights_sha256": teacher.weights_sha256}


def load_teacher(cfg, method, image_size: int, channels: int) -> TrainedModel:
    """The model `method` distils (`finetune.teacher`), checked like the model it starts from; in eval mode."""
    return _load_checked(cfg, method, image_size, channels, TEACHER_KEY)


def starting_points(cfg, method, image_size: int, channels: int) -> tuple[Initialisation | None, TrainedModel | None]:
    """What `method` trains from under `cfg`: the model it starts from (a fine-tuned method's) and the one it
    distils (its teacher), each None where it has none; InitialisationError naming the key when one does not fit."""
    init = load_initialisation(cfg, method, image_size, channels) if cfg.finetuned(method.name) else None
    teacher = load_teacher(cfg, method, image_size, channels) if method.distills_from else None
    return init, teacher


def load_initialisation(cfg, method, image_size: int, channels: int) -> Initialisation:
    path = cfg.finetune.init_from
    trained = _load_checked(cfg, method, image_size, channels, KEY)
    state = trained.net.state_dict()
    return Initialisation(path=str(path), method=trained.method.name, images=trained.images,
                          weights_sha256=trained.weights_sha256, state_dict=state)


@torch.no_grad()
def initialise(net: torch.nn.Module, init: Initialisation) -> None:
    """Copy the source weights into `net` (a U-Net of the same shape, with or without an estimate input)."""
    own = net.state_dict()
    missing = sorted(set(init.state_dict) - set(own))
    if missing:
        raise InitialisationError(f"{KEY}: {init.path} has weights this network lacks: {', '.join(missing[:5])}")
    for name, source in init.state_dict.items():
        target = own[name]
        if target.shape == source.shape:
            target.copy_(source)
        elif name == "input_conv.weight" and target.shape[1] == 2 * source.shape[1]:
            # concat conditioning: the input is [x0_est, x_t]; the estimate's channels start at zero
            target.zero_()
            target[:, source.shape[1]:] = source
        else:
            raise InitialisationError(f"{KEY}: {init.path}: {name} is {tuple(source.shape)}, this network's is "
                                      f"{tuple(target.shape)}")
    for module in net.modules():
        if isinstance(module, CrossAttention):  # x + proj(attention to the estimate): adds nothing at first
            torch.nn.init.zeros_(module.proj.weight)
            torch.nn.init.zeros_(module.proj.bias)
