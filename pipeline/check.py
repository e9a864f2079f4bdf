"""Stage check: params.yaml and what it asks of this machine, validated before any other stage runs.

Every stage depends on this stage's output, so DVC runs it first and an invalid parameter stops
`dvc repro` (and `dvc exp run -S ...`) before any stage removes its outputs. The output's content
does not depend on the params, so a valid change reruns only the stages whose params changed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .common import start

if TYPE_CHECKING:
    from dddm.config import Config


def environment_problems(cfg: Config) -> list[str]:
    """What params.yaml asks that this machine cannot give; each names the key."""
    import torch

    problems = []
    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        problems.append("train.device: 'cuda' but no CUDA device is available (use auto or cpu)")
    if tc.device != "cpu" and torch.cuda.is_available() and tc.nproc > torch.cuda.device_count():
        problems.append(f"train.nproc: {tc.nproc} processes but only {torch.cuda.device_count()} GPU(s)")
    directory = Path(tc.checkpoint_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        problems.append(f"train.checkpoint_dir: {directory} is not a writable directory ({e.strerror})")
    for name in cfg.methods:
        store = getattr(cfg.method_config(name), "store", None)
        if store is not None and store.directory and not os.access(Path(store.directory).parent, os.W_OK):
            problems.append(f"method.{name}.store.directory: {store.directory} cannot be created here")
    return problems


def main() -> None:
    cfg, args = start("check", __doc__, out="the file later stages depend on (written when params are valid)")
    problems = environment_problems(cfg)
    if problems:
        sys.exit("check: invalid parameters\n" + "\n".join(problems))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("params.yaml is valid\n")
    print(f"check: params valid; methods {', '.join(cfg.methods)}")


if __name__ == "__main__":
    main()
