"""A method name never reaches a shell (issue 32): DVC pastes a matrix value into a stage's command unquoted, and
a method named `udddm; touch M #` in params.yaml (with its sections) ran `touch M` under `dvc repro -s
'train@udddm; touch M #'`. dvc.yaml's commands name no method (a stage reads it from DVC_STAGE), so the stage
refuses the name as the check stage does, and the payload never runs. Real `dvc repro` in a copy with outputs."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import copy_repo, left_running, repro, state, tiny_params, write_params
from dddm.methods import NAMES

pytestmark = pytest.mark.slow

BAD = "udddm; touch M #"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from dddm.data import prepare_dataset

    repo = copy_repo(tmp_path_factory.mktemp("repo"), outputs=True)
    params = tiny_params(methods=[BAD], finetune={"methods": []})
    params["method"][BAD] = copy.deepcopy(params["method"]["udddm"])  # copies: yaml would write an alias
    params["sampler"][BAD] = copy.deepcopy(params["sampler"]["udddm"])
    write_params(repo, params)
    assert BAD in yaml.safe_load((repo / "params.yaml").read_text())["methods"]
    prepare_dataset("digits", None, 8, repo / "data/prepared.arrow", progress=False)  # train's input
    return repo


@pytest.mark.parametrize("args, refusal", [
    (["-s", f"train@{BAD}"], "train: invalid parameters"),
    (["-s", f"sample@{BAD}"], "sample: invalid parameters"),
    ([], "check: invalid parameters"),
], ids=["train alone", "sample alone", "the pipeline"])
def test_a_method_name_with_a_shell_command_runs_nothing(repo, args, refusal):
    # the sample stage's input, which DVC looks for before it runs the stage's command (and the train stage, its
    # output, deletes first)
    model = repo / "out/train" / BAD / "model.pt"
    if args[1:] == [f"sample@{BAD}"]:
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(b"")
    else:
        model.unlink(missing_ok=True)
    before = state(repo)
    run = repro(repo, *args)
    assert run["rc"] != 0, run["stderr"][-3000:]
    assert not (repo / "M").exists(), run["stderr"][-3000:]
    lines = run["stderr"].splitlines()
    assert refusal in lines and "Traceback" not in run["stderr"], run["stderr"][-3000:]
    assert lines[lines.index(refusal) + 1] == (f"params.yaml: methods: {BAD!r} is not one of {', '.join(NAMES)} "
                                               f"(methods) (got {[BAD]!r})"), run["stderr"][-3000:]
    assert run["s"] < 10 and run["peak_mb"] < 1024, run
    assert state(repo) == before
    assert left_running(repo) == []
