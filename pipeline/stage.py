"""What every stage does first: logging, its path arguments (given by dvc.yaml), one-line errors, its params
validated once (errors name the key), and its thread count.

The data stages (prepare, classifier, reference) start here and read only the sections they use
(dddm.sections.DataParams); the method stages start through pipeline.common, which validates all of
params.yaml with the methods. So an edit to the methods' machinery reruns no data stage. Stage modules import
torch, MLflow and the rest of `dddm` inside `main()`, after the arguments are parsed, so
`python -m pipeline.<stage> --help` answers at once (tests/test_cli_imports.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from dddm.sections import DataParams

PARAMS = os.environ.get("DDDM_PARAMS", "params.yaml")
DEBUG = "DDDM_DEBUG"  # =1: the traceback of every error, not one line
Params = TypeVar("Params")


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


def dvc_stage_method() -> str | None:
    """The method of the matrix stage DVC runs (DVC_STAGE, which DVC sets for every command: `train@udddm`).
    dvc.yaml's commands do not name it: DVC pastes a matrix value into the shell unquoted, so a method named
    `udddm; touch M #` in params.yaml ran its payload (issue 32). Read from here, it is one argument, refused
    by the params' schema before any path is made of it."""
    return os.environ.get("DVC_STAGE", "").partition("@")[2] or None


def begin(stage: str, doc: str | None, paths: dict[str, str], load: Callable[[str, argparse.Namespace], Params],
          method_help: str | None = None) -> tuple[Params, argparse.Namespace]:
    """Parse `--<name> PATH` for each of `paths` ({name: help}) and, given `method_help`, `--method` (DVC's
    stage's by default: dvc_stage_method); set up
    logging; `load(params.yaml, args)` (exiting with the key named when the params are invalid); set the
    thread count."""
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=doc)
    for name, help_text in paths.items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, help=help_text)
    if method_help:
        method = dvc_stage_method()
        ap.add_argument("--method", default=method, required=method is None,
                        help=f"{method_help}; run by DVC: the method of DVC_STAGE")
    args = ap.parse_args()
    one_line_errors(stage)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {stage}[{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(PARAMS, args)
    except ValueError as e:  # ConfigError, and a method's own rules
        sys.exit(f"{stage}: invalid parameters\n{e}")
    from dddm.compute import threads_per_process, use_threads  # torch

    # set, not left to torch: results depend on it (the train launcher has set OMP_NUM_THREADS for its workers)
    use_threads(threads_per_process(cfg.train.threads))
    return cfg, args


def start(stage: str, doc: str | None = None, **paths: str) -> tuple[DataParams, argparse.Namespace]:
    """A data stage's start: the sections of dddm.sections.DataParams."""
    from dddm.sections import load_data_params

    return begin(stage, doc, paths, lambda path, args: load_data_params(path))
