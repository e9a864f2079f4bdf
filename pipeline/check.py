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


def unwritable(directory: Path) -> str | None:
    """Why `directory` (created if missing) cannot take a file, or None: the directory itself is
    tried, so a read-only mount is found here, not by the stage that writes into it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def environment_problems(cfg: Config) -> list[str]:
    """What params.yaml asks that this machine cannot give; each names the key."""
    import torch

    from dddm.compute import resolve_device
    from dddm.data import local_path_problem
    from dddm.limits import Machine, machine_problems, shard_problems

    problems = []
    if (why := local_path_problem(cfg.data.source, cfg.data.path)) is not None:
        problems.append(f"data.path: {why}")
    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        return ["train.device: 'cuda' but no CUDA device is available (use auto or cpu)"]
    device = resolve_device(tc.device)
    if device.type == "cuda" and tc.nproc > torch.cuda.device_count():
        problems.append(f"train.nproc: {tc.nproc} processes but only {torch.cuda.device_count()} GPU(s)")
    if device.type == "cpu" and tc.nproc > (os.cpu_count() or 1):
        problems.append(f"train.nproc: {tc.nproc} gloo processes but this machine has {os.cpu_count()} CPU(s); "
                        f"at most one process per CPU")
    directories = {"train.checkpoint_dir": tc.checkpoint_dir}
    for name in cfg.compared:
        store = getattr(cfg.method_config(name), "store", None)
        if store is not None and store.directory:
            directories[f"method.{name}.store.directory"] = store.directory
    for key, directory in directories.items():
        if (why := unwritable(Path(directory))) is not None:
            problems.append(f"{key}: {directory} is not a writable directory ({why})")
    problems += shard_problems(cfg)
    problems += sample_count_problems(cfg)
    problems += finetune_problems(cfg)
    if problems or cfg.limits.machine == "ignore":
        return problems
    return machine_problems(cfg, Machine.here(device))


def sample_count_problems(cfg: Config) -> list[str]:
    """Too few samples for the Frechet distance the score stage and the learning curve compute (the covariance
    of d features needs d + 1): found here, not after DVC has deleted the train or sample stage's outputs."""
    from dddm.classifier import FEATURE_DIM
    from dddm.scoring import INCEPTION_FID_LAYER, check_count

    counts = [("sample.num_samples", cfg.sample.num_samples, FEATURE_DIM, "scoring classifier")]
    if cfg.score.use_inception == "always":
        counts.append(("sample.num_samples", cfg.sample.num_samples, int(INCEPTION_FID_LAYER), "Inception"))
    if cfg.train.eval_every:
        counts.append(("train.eval_samples", cfg.train.eval_samples, FEATURE_DIM, "scoring classifier"))
    problems = []
    for key, n, dim, network in counts:
        try:
            check_count(n, dim, name=key, network=network)
        except ValueError as e:
            problems.append(str(e))
    return problems


def finetune_problems(cfg: Config) -> list[str]:
    """`finetune.init_from` and, for a method that distils, `finetune.teacher`: a model this run's train stage
    writes, or an existing compatible model file."""
    from dddm.finetune import KEY, TEACHER_KEY
    from dddm.methods import METHODS

    ft = cfg.finetune
    problems = model_file_problems(cfg, KEY, ft.init_from, list(ft.methods))
    distilling = [name for name in ft.methods if METHODS[name].distills_from]
    if distilling:
        problems += model_file_problems(cfg, TEACHER_KEY, ft.teacher, distilling)
    return problems


def model_file_problems(cfg: Config, key: str, file: str | None, methods: list[str]) -> list[str]:
    from dddm.checkpoint import CheckpointError, load_model
    from dddm.finetune import InitialisationError, check_compatible
    from dddm.methods import METHODS

    if not methods:
        return []
    path = Path(file)
    producer = next((m for m in METHODS if path == Path(f"out/train/{m}/model.pt")), None)  # dvc.yaml's train outs
    if producer in cfg.methods:
        return []  # the train stage writes it first (a DVC dependency)
    if not path.is_file():
        hint = f"; it is the {producer} train stage's model, but {producer} is not in methods (add it to methods, " \
               f"or name an existing model file)" if producer else ""
        return [f"{key}: {path}: model file not found{hint}"]
    try:
        trained = load_model(path)
        for name in methods:
            check_compatible(cfg, cfg.make_method(name), trained, str(path), cfg.data.image_size,
                             trained.dataset["channels"], key)
    except (CheckpointError, InitialisationError, ValueError) as e:
        return [str(e) if isinstance(e, InitialisationError) else f"{key}: {e}"]
    return []


def main() -> None:
    cfg, args = start("check", __doc__, out="the file later stages depend on (written when params are valid)")
    problems = environment_problems(cfg)
    if problems:
        sys.exit("check: invalid parameters\n" + "\n".join(problems))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("params.yaml is valid\n")
    print(f"check: params valid; methods {', '.join(cfg.compared)}")


if __name__ == "__main__":
    main()
