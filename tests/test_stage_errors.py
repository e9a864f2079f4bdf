"""What a stage says when it cannot run: its expected errors (an input an earlier stage writes is missing, a
bad param, a damaged file) are one line, `<stage>: <what is wrong>`, with no traceback; DDDM_DEBUG=1 shows it.
Each stage's own command, as dvc.yaml runs it, in a repository whose stages have not run."""

import subprocess
import sys

import pytest

from conftest import ROOT, run_env, stage_command, tiny_params, write_params

pytestmark = pytest.mark.slow

# each stage (uDDDM's for the method stages) and the start of what it says, run before any other has
MISSING = {"classifier": "classifier: data/prepared.arrow: no prepared dataset there (run the prepare stage)",
           "reference": "reference: data/prepared.arrow: no prepared dataset there (run the prepare stage)",
           "train@udddm": "train: data/prepared.arrow: no prepared dataset there (run the prepare stage)",
           "sample@udddm": "sample: out/train/udddm/model.pt: model file not found (run the train stage first)",
           "score@udddm": "score: out/train/udddm/model.pt: model file not found (run the train stage first)",
           "compare": "compare: out/real/metrics.json: not found (`dvc repro compare` runs the stages before it",
           "register": "register: out/score/udddm/metrics.json: not found (`dvc repro register` runs the stages"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from conftest import copy_repo

    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    write_params(repo, tiny_params(methods=["udddm"], finetune={"methods": []}))
    return repo


def said(repo, name: str, **env) -> str:
    """What the stage printed on stderr; it must have failed."""
    done = subprocess.run(stage_command(repo, name), cwd=repo, env=run_env(**env), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    return done.stderr


@pytest.mark.parametrize("name", MISSING)
def test_a_missing_input_is_one_line(repo, name):
    stderr = said(repo, name)
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(MISSING[name]) and "Traceback" not in stderr, stderr[-3000:]


def test_a_damaged_input_and_a_bad_param_are_one_line_and_debug_shows_the_traceback(repo):
    (repo / "data").mkdir(exist_ok=True)
    (repo / "data/prepared.arrow").write_bytes(b"not an arrow file" * 100)
    stderr = said(repo, "train@udddm")
    assert stderr.strip().splitlines()[-1].startswith("train: data/prepared.arrow: not a prepared dataset") and \
        "Traceback" not in stderr, stderr[-3000:]
    assert "Traceback" in said(repo, "train@udddm", DDDM_DEBUG="1")
    write_params(repo, tiny_params(train={"lr": -1}))
    stderr = said(repo, "check")
    assert stderr.splitlines() == ["check: invalid parameters",
                                   "params.yaml: train.lr: Input should be greater than 0 (got -1)"], stderr


def test_a_full_disk_during_prepare_is_one_line_naming_the_file(tmpfs):
    """OSError 28 names no file (it comes from a write to an open one): the stage names the file it wrote."""
    full = tmpfs("16k")  # the prepared digits take about 120 kB
    done = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--prepared", str(full / "prepared.arrow"),
                           "--info", str(full / "prepared.json")], cwd=ROOT, env=run_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    said = f"prepare: {full / 'prepared.arrow'}: No space left on device while writing it"
    assert done.stderr.splitlines() == [said], done.stderr[-3000:]
    assert not list(full.iterdir())  # no partial file
