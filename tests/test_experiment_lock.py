"""An experiment started while another DVC operation holds the repository (issue 22, item 5): refused
before params.yaml changes, and the running operation records the params its model was trained with."""

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from conftest import NO_MLFLOW_MODEL, run_env, tiny_params, write_params
from dddm.checkpoint import load_model

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def training(repo) -> Iterator[subprocess.Popen]:
    """`dvc repro train@edm` in `repo`, handed over once its train stage has logged its first steps (the
    experiment is tried while it trains); killed on the way out."""
    repro = subprocess.Popen(["dvc", "repro", "train@edm"], cwd=repo, env=run_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((repo / "checkpoints").glob("edm-*/history.jsonl")):
            time.sleep(0.2)
        assert repro.poll() is None, "dvc repro ended before the experiment was tried"
        yield repro
    finally:
        repro.kill()


def test_an_experiment_is_refused_while_dvc_repro_runs_and_the_lock_stays_true(tiny_copy):
    # 4 epochs of 29 steps: the experiment is tried (in 0.2 s) while the train stage runs; no learning curve
    write_params(tiny_copy, tiny_params(methods=["edm"], finetune={"methods": []},
                                        train={"epochs": 4, "batch_size": 64, "eval_every": 0},
                                        tracking=NO_MLFLOW_MODEL))
    with training(tiny_copy) as repro:
        params_before = (tiny_copy / "params.yaml").read_bytes()
        refused = subprocess.run([sys.executable, "-m", "pipeline.exp", "-S", "train.lr=0.0005"], cwd=tiny_copy,
                                 env=run_env(), capture_output=True, text=True, timeout=120)
        assert (tiny_copy / "params.yaml").read_bytes() == params_before
        out, _ = repro.communicate(timeout=900)
    assert refused.returncode == 1
    assert refused.stderr.startswith("exp: another DVC operation is at work in") and "repro train@edm" in refused.stderr
    assert repro.returncode == 0, out[-3000:]
    locked = yaml.safe_load((tiny_copy / "dvc.lock").read_text())["stages"]["train@edm"]["params"]["params.yaml"]
    trained = load_model(tiny_copy / "out/train/edm/model.pt").cfg
    assert locked["train"]["lr"] == trained.train.lr == 2e-4
    verified = subprocess.run([sys.executable, "-m", "pipeline.exp", "verify"], cwd=tiny_copy, env=run_env(),
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and "records the params each model was trained with" in verified.stdout
    # what DVC's own exp run used to leave (README, Known issues): dvc.lock naming an lr the model was not trained with
    lock = (tiny_copy / "dvc.lock").read_text()
    assert "lr: 0.0002" in lock
    (tiny_copy / "dvc.lock").write_text(lock.replace("lr: 0.0002", "lr: 0.0005"))
    verified = subprocess.run([sys.executable, "-m", "pipeline.exp", "verify"], cwd=tiny_copy, env=run_env(),
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 1
    assert "out/train/edm/model.pt: train.lr: 0.0002 in the model, 0.0005 in dvc.lock" in verified.stderr


def test_a_plain_dvc_exp_run_during_dvc_repro_leaves_no_false_lock(tiny_copy):
    """Issue 32, item 1: DVC's own `dvc exp run -S` (not pipeline.exp) rewrites params.yaml before it finds the
    repository busy and exits 255; the train stage then fails instead of letting DVC record the new lr in dvc.lock
    for a model trained with the old one. params.yaml stays rewritten: DVC's (README, Known issues)."""
    # 15 epochs of 29 steps: training outlasts the experiment's start (DVC's, 2-3 s); a commit, which it needs
    write_params(tiny_copy, tiny_params(methods=["edm"], finetune={"methods": []},
                                        train={"epochs": 15, "batch_size": 64, "eval_every": 0},
                                        tracking=NO_MLFLOW_MODEL))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=tiny_copy, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=tiny_copy, check=True)
    locked = (tiny_copy / "dvc.lock").read_text()
    with training(tiny_copy) as repro:
        experiment = subprocess.run(["dvc", "exp", "run", "-S", "train.lr=0.0004"], cwd=tiny_copy, env=run_env(),
                                    capture_output=True, text=True, timeout=120)
        out, _ = repro.communicate(timeout=900)
    assert experiment.returncode == 255 and "is busy" in experiment.stderr, experiment.stderr[-2000:]
    assert "lr: 0.0004" in (tiny_copy / "params.yaml").read_text()
    assert repro.returncode != 0, out[-3000:] + experiment.stderr[-2000:]
    assert "train: params.yaml changed while this stage trained" in out and "Traceback" not in out, out[-3000:]
    # the stages before it recorded, the train stage not (its entry is the copied repository's)
    train = [yaml.safe_load(text)["stages"]["train@edm"] for text in (locked, (tiny_copy / "dvc.lock").read_text())]
    assert train[1] == train[0], train[1]
