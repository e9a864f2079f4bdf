"""Remove the checkpoint directories no current configuration can resume.

    python -m pipeline.prune            # list what would be removed, and how much space it holds
    python -m pipeline.prune --delete   # remove it

Each training configuration gets its own directory under `train.checkpoint_dir`
(`<method>-<hash of the training params and dataset>`, holding its newest `train.keep_checkpoints`
checkpoints and its x0 store), and nothing removes the directories of configurations no longer in use:
an afternoon of experiments left 151 MB in 9 of them. Kept: the directories of params.yaml's methods as
it stands, the fine-tuned ones included (what `dvc repro` with `train.resume: auto` would continue),
the `--keep` most recently written others, and any a trainer is running in. DVC's own cache is pruned
by `dvc gc` (see the README).
"""

import argparse
import json
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

from .stage import PARAMS


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.prune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared-info", type=Path, default=Path("data/prepared.json"),
                    help="the prepare stage's info JSON (the dataset fingerprint in the directory names)")
    ap.add_argument("--keep", type=int, default=0, help="also keep this many of the newest other directories")
    ap.add_argument("--delete", action="store_true", help="remove them (without it: only list them)")
    args = ap.parse_args()
    from dddm import runlock
    from dddm.config import ConfigError, load_config
    from dddm.finetune import InitialisationError, starting_points
    from dddm.training import run_directory

    try:
        cfg = load_config(PARAMS)
    except (ConfigError, ValueError) as e:
        sys.exit(f"prune: invalid parameters\n{e}")
    root = Path(cfg.train.checkpoint_dir).resolve()
    if not root.is_dir():
        print(f"prune: {root} does not exist; nothing to remove")
        return
    current, undecided = set(), set()
    if args.prepared_info.is_file():
        info = json.loads(args.prepared_info.read_text())
        for name in cfg.compared:
            # a fine-tuned method's directory is named by the weights it starts from (and distils), as the train
            # stage names it; without those files its current directory cannot be told: all of the method's stay
            try:
                init, teacher = starting_points(cfg, cfg.make_method(name), info["image_size"], info["channels"])
            except InitialisationError as e:
                undecided.add(name)
                print(f"keep every {name}-* directory: its current one is named by a model file that does not load "
                      f"({e})")
                continue
            current.add(run_directory(cfg, name, info["fingerprint"], init, teacher).resolve())
    else:
        print(f"prune: {args.prepared_info} not found (run the prepare stage), so no directory counts as current")
    # resolved: a current run directory that is a symbolic link is still current
    others = sorted((d for d in root.iterdir() if d.is_dir() and d.resolve() not in current
                     and d.name.rsplit("-", 1)[0] not in undecided),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for directory in sorted(current):
        if directory.is_dir():
            print(f"keep {directory} (params.yaml's configuration)")
    for directory in others[:args.keep]:
        print(f"keep {directory} (one of the {args.keep} newest others)")
    freed = 0
    for directory in others[args.keep:]:
        if directory.is_symlink():  # its target lies outside train.checkpoint_dir: not this command's to remove
            print(f"keep {directory}: a symbolic link to {directory.resolve()}; remove the two yourself if unused")
            continue
        bytes_ = size(directory)
        try:
            # a trainer holds the lock file it made; a directory without one gets none (a listing changes nothing)
            with runlock.hold_here(directory) if (directory / runlock.LOCK_FILE).exists() else nullcontext():
                if args.delete:
                    shutil.rmtree(directory)
                freed += bytes_
                print(f"{'removed' if args.delete else 'would remove'} {directory} ({bytes_ / 1e6:.1f} MB)")
        except runlock.RunLocked as e:
            print(f"keep {directory}: {e}")
    print(f"prune: {'freed' if args.delete else 'would free'} {freed / 1e6:.1f} MB"
          + ("" if args.delete else "; run with --delete to remove"))


if __name__ == "__main__":
    main()
