"""Issue 32's trials through `dvc repro`, as a user types it, in a copy of the repository with its outputs:
params that passed the check stage and then cost a later stage's outputs (DVC deletes them before the stage
runs) or gigabytes. Each is now refused by the check stage, DVC's first, within 10 s and 1 GB, naming the key
or file in one line; params.yaml, dvc.lock, data/ and out/ are left as they were, and no process is left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo, left_running, repro, state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("repo"), outputs=True)


def params(repo: Path, **sections) -> str:
    """The repository's params.yaml with `sections`' keys (dotted: `train.eval_samples`) set, as YAML."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in sections.items():
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    return yaml.safe_dump(raw, sort_keys=False)


def fifo(repo: Path) -> str:
    path = repo.parent / "cifar-10-python.tar.gz"
    if not path.exists():
        os.mkfifo(path)
    return str(path)


# (case, params.yaml's text for the repository copy, what the refusal's line starts with)
CASES = [
    ("a 50 MB params.yaml", lambda repo: params(repo, **{"tracking.experiment": "x" * 50 * 2**20}),
     "params.yaml: larger than 1 MB"),
    ("data.path a FIFO", lambda repo: params(repo, **{"data.source": "cifar10", "data.path": fifo(repo)}),
     "data.path: "),
    ("data.path /dev/zero", lambda repo: params(repo, **{"data.source": "cifar10", "data.path": "/dev/zero"}),
     "data.path: /dev/zero is not a regular file or directory"),
    ("T 2 * 10^9", lambda repo: params(repo, **{"method.udddm.processes.ve.T": 2 * 10**9}),
     "params.yaml: method.udddm.processes.ve.T: 2000000000 is above 1000000"),
    ("64 learning-curve samples", lambda repo: params(repo, **{"train.eval_samples": 64}),
     "train.eval_samples: 64 images are too few"),
    ("p_mean .nan", lambda repo: params(repo, **{"method.edm.p_mean": float("nan")}),
     "params.yaml: method.edm.p_mean: Input should be a finite number"),
]


@pytest.mark.parametrize("make, refusal", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_check_refuses_before_any_output_is_deleted(repo, make, refusal):
    original = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(make(repo))
    before = state(repo)
    try:
        run = repro(repo)
        assert run["rc"] != 0, run["stderr"][-3000:]
        lines = run["stderr"].splitlines()
        assert "check: invalid parameters" in lines and "Traceback" not in run["stderr"], run["stderr"][-3000:]
        assert lines[lines.index("check: invalid parameters") + 1].startswith(refusal), run["stderr"][-3000:]
        assert run["s"] < 10 and run["peak_mb"] < 1024, run
        assert state(repo) == before
        assert left_running(repo) == []
    finally:
        (repo / "params.yaml").write_text(original)
