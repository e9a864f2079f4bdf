"""How a method stage starts (train, sample, score, compare, register, check): pipeline.stage's start with all of
params.yaml validated, the methods' sections included."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dddm.methods import NAMES  # without torch

from .stage import begin

if TYPE_CHECKING:
    from dddm.config import Config

METHOD_HELP = f"a method of params `methods` or `finetune.methods` ({', '.join(NAMES)})"


def _load(per_method: bool):
    def load(path: str, args: argparse.Namespace) -> Config:
        from dddm.config import load_config  # torch, through the methods' registry

        cfg = load_config(path)
        if per_method:
            cfg.method_config(args.method)
        return cfg
    return load


def start(stage: str, doc: str | None = None, *, per_method: bool = False,
          **paths: str) -> tuple[Config, argparse.Namespace]:
    return begin(stage, doc, paths, _load(per_method), METHOD_HELP if per_method else None)
