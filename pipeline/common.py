"""What every stage does first: logging, its path arguments (given by dvc.yaml), and params.yaml
validated once (errors name the key).

Stage modules import torch, MLflow and the rest of `dddm` inside `main()`, after `start()` has parsed the
arguments, so `python -m pipeline.<stage> --help` answers at once (tests/test_cli_imports.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dddm.methods import NAMES  # without torch

if TYPE_CHECKING:
    from dddm.config import Config

PARAMS = os.environ.get("DDDM_PARAMS", "params.yaml")
METHOD_HELP = f"a method of params `methods` or `finetune.methods` ({', '.join(NAMES)})"
DEBUG = "DDDM_DEBUG"  # =1: the traceback of every error, not one line


def one_line_errors(stage: str) -> None:
    """The project's own errors (the classes of `dddm`: bad params, missing or damaged inputs, a tracking server
    that does not answer, ...) and a missing file end the stage with one line, `<stage>: <what is wrong>`, the
    form the flows report; any other error is a bug and keeps its traceback, as every error does with
    DDDM_DEBUG=1."""
    def hook(kind, error, tb):
        if os.environ.get(DEBUG) == "1" or not (kind.__module__.split(".")[0] == "dddm" or
                                                issubclass(kind, FileNotFoundError)):
            sys.__excepthook__(kind, error, tb)
        elif isinstance(error, FileNotFoundError) and error.filename:  # an input an earlier stage writes
            print(f"{stage}: {error.filename}: not found (`dvc repro {stage}` runs the stages before it; "
                  f"{DEBUG}=1 shows the traceback)", file=sys.stderr)
        else:
            print(f"{stage}: {error}", file=sys.stderr)
    sys.excepthook = hook


def start(stage: str, doc: str | None = None, *, per_method: bool = False,
          **paths: str) -> tuple[Config, argparse.Namespace]:
    """Parse `--<name> PATH` for each of `paths` ({name: help}) and, for a method's stage, `--method`;
    set up logging; load and validate params.yaml, exiting with the key named when it is invalid."""
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=doc)
    for name, help_text in paths.items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, help=help_text)
    if per_method:
        ap.add_argument("--method", required=True, help=METHOD_HELP)
    args = ap.parse_args()
    one_line_errors(stage)
    from dddm.config import ConfigError, load_config  # torch, through the methods' registry

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {stage}[{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(PARAMS)
        if per_method:
            cfg.method_config(args.method)
    except (ConfigError, ValueError) as e:
        sys.exit(f"{stage}: invalid parameters\n{e}")
    from dddm.distributed import threads_per_process, use_threads

    # set, not left to torch: results depend on it (the train launcher has set OMP_NUM_THREADS for its workers)
    use_threads(threads_per_process(cfg.train.threads))
    return cfg, args
