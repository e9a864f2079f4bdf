"""The committed dvc.lock is what the committed code and params produce: in a fresh checkout `dvc status`
reports no stage whose code, params or command changed, nor a committed output (one kept in git) that
differs from the lock. Outputs in DVC's cache are missing there, and may be (a fresh clone reruns them).

A commit that changes what a stage runs re-runs the pipeline (`make repro`) and commits dvc.lock and the
outputs with it (README, "Changing a stage's code")."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import copy_repo, run_env

# what a fresh clone may see: outputs that live in DVC's cache, not in git
MISSING = ("deleted", "not in cache")


def stale(status: dict, made: set[str] = frozenset()) -> list[str]:
    """`stage: path: change` for each code, params, command or committed-output change `dvc status` reports.
    A dep that a stage makes (`made`, or a directory of them) is judged as that stage's output: in a clone it
    holds only the committed files of its outputs until the stage runs (out/train: curves yes, model.pt no)."""
    def upstream(path: str) -> bool:
        return any(path == o or Path(path) in Path(o).parents for o in made)

    found = []
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # "changed checksum", "always changed"
                found.append(f"{stage}: {change}")
                continue
            for kind, entries in change.items():
                if kind == "changed command":
                    found.append(f"{stage}: its command changed")
                    continue
                for path, state in (entries or {}).items():
                    if isinstance(state, dict):  # params.yaml: {key: modified | new | deleted}
                        found += [f"{stage}: {path}: {key} {s}" for key, s in state.items()]
                    elif state not in MISSING and not (kind == "changed deps" and upstream(path)):
                        found.append(f"{stage}: {path}: {state}")
    return found


def test_the_committed_lock_matches_the_committed_code_and_params(tmp_path):
    repo = copy_repo(tmp_path / "repo", outputs=True)  # what a clone has: committed outputs too
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    made = {out["path"] for stage in lock.values() for out in stage.get("outs", [])}
    problems = stale(json.loads(done.stdout or "{}"), made)
    assert not problems, ("dvc.lock is stale against the code or params; rerun `make repro` and commit dvc.lock "
                          "and the outputs with the change:\n" + "\n".join(problems))


def test_the_check_names_a_code_change_and_ignores_missing_cached_outputs():
    status = {"train@edm": [{"changed deps": {"dddm/curves.py": "modified", "data/prepared.arrow": "deleted",
                                              "params.yaml": {"train.lr": "modified"}}},
                            {"changed outs": {"out/train/edm/model.pt": "not in cache",
                                              "out/train/edm/curve.tsv": "modified"}}],
              "prepare": [{"changed outs": {"data/prepared.arrow": "not in cache"}}],
              "compare": [{"changed deps": {"out/train": "modified"}}]}
    assert stale(status, {"out/train/edm/model.pt", "data/prepared.arrow"}) == ["train@edm: dddm/curves.py: modified", "train@edm: params.yaml: train.lr modified",
                             "train@edm: out/train/edm/curve.tsv: modified"]
