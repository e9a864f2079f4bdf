"""Several nodes rehearsed on one machine: torchrun agents started as the train stage starts them
(`python -m pipeline.launch pipeline.train ...`, one per "node", 1 gloo process each) meet at a c10d
rendezvous on 127.0.0.1; a kill -9 of one agent, the rerun, a node that never comes, bad params."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import ROOT, free_port, run_env, tiny_params
from dddm.data import prepare_dataset

LAUNCH = [sys.executable, "-m", "pipeline.launch", "pipeline.train", "--method", "udddm",
          "--classifier", str(ROOT / "data" / "classifier.pt")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The prepared digits and an MLflow SQLite store, made once (creating its tables takes seconds)."""
    import mlflow

    root = tmp_path_factory.mktemp("multinode")
    prepare_dataset("digits", None, 8, root / "prepared.arrow", progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return root, uri


def params(tmp_path: Path, name: str, nproc: int, nnodes: int, timeout: int = 60) -> Path:
    """4 epochs of 8 steps (batch 128 per process, world size 2), a checkpoint every 5 steps."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_params(
        train={"epochs": 4, "batch_size": 128, "nproc": nproc, "nnodes": nnodes, "checkpoint_every": 5,
               "checkpoint_dir": str(tmp_path / name / "checkpoints"), "eval_every": 0},  # curves: test_finetune
        rendezvous={"endpoint": f"127.0.0.1:{free_port()}", "id": name, "timeout": timeout},
        tracking={"experiment": name})))
    return path


def launch(shared, params_file: Path, out: Path, log: Path) -> subprocess.Popen:
    root, uri = shared
    return subprocess.Popen([*LAUNCH, "--prepared", str(root / "prepared.arrow"), "--out", str(out)], cwd=ROOT,
                            env=run_env(DDDM_PARAMS=str(params_file), MLFLOW_TRACKING_URI=uri),
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def finish(agents, logs, timeout=300) -> None:
    for agent, log in zip(agents, logs):
        assert agent.wait(timeout) == 0, log.read_text()[-4000:]


def weights_sha256(out: Path) -> str:
    return torch.load(out / "model.pt", weights_only=True)["weights_sha256"]


def processes_of(out: Path) -> list[psutil.Process]:
    """Every agent and worker of a run: their command lines name its output directory."""
    return [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
def test_two_nodes_train_what_one_node_trains_and_a_kill_9_of_one_node_stops_both_then_resumes(tmp_path, shared):
    import mlflow

    one = tmp_path / "one-node" / "out"
    log = tmp_path / "one-node.log"
    finish([launch(shared, params(tmp_path, "one-node", nproc=2, nnodes=1), one, log)], [log])

    two = tmp_path / "two-nodes" / "out"
    pfile = params(tmp_path, "two-nodes", nproc=1, nnodes=2)
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    history = None
    agents = [launch(shared, pfile, two, log) for log in logs]
    deadline = time.time() + 300
    while history is None or len(history.read_text().splitlines()) < 7:  # a checkpoint at step 5 is written
        assert all(a.poll() is None for a in agents) and time.time() < deadline, logs[0].read_text()[-4000:]
        history = next((tmp_path / "two-nodes" / "checkpoints").glob("*/history.jsonl"), None)
        time.sleep(0.05)
    tree = processes_of(two)
    assert len(tree) == 4, tree  # two agents, a worker each
    agents[1].kill()
    assert agents[0].wait(120) != 0  # the other node's worker lost its peer; its agent stops
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive and not processes_of(two), f"left after the kill: {alive}"
    assert not (two / "model.pt").exists()

    agents = [launch(shared, pfile, two, log) for log in logs]
    finish(agents, logs)
    assert "resumed from" in logs[0].read_text() + logs[1].read_text()
    assert weights_sha256(two) == weights_sha256(one)
    # global rank 0 alone logged: one MLflow run for the two nodes, continued by the rerun
    runs = mlflow.MlflowClient(shared[1]).search_runs(
        [mlflow.MlflowClient(shared[1]).get_experiment_by_name("two-nodes").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.tags["host"] == socket.gethostname() and len(runs[0].data.tags["mlflow.source.git.commit"]) == 40


@pytest.mark.slow
def test_a_node_that_never_comes_ends_in_a_timeout_naming_the_endpoint(tmp_path, shared):
    pfile = params(tmp_path, "alone", nproc=1, nnodes=2, timeout=5)
    endpoint = yaml.safe_load(pfile.read_text())["rendezvous"]["endpoint"]
    log = tmp_path / "alone.log"
    agent = launch(shared, pfile, tmp_path / "out", log)
    assert agent.wait(180) != 0  # the default join timeout would be 600 s
    text = log.read_text()
    assert f"train: the rendezvous at {endpoint} (rendezvous.endpoint) failed: RendezvousTimeoutError" in text, text
    assert "Each of the train.nnodes=2 nodes runs `python -m pipeline.launch pipeline.train --method udddm" in text


def test_several_nodes_without_an_endpoint_are_refused_before_anything_is_launched(tmp_path):
    raw = yaml.safe_load(params(tmp_path, "bad", nproc=1, nnodes=2).read_text())
    raw["rendezvous"]["endpoint"] = None
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([*LAUNCH, "--prepared", "x", "--out", str(tmp_path / "out")], cwd=ROOT, timeout=120,
                            env=run_env(DDDM_PARAMS=str(tmp_path / "bad.yaml")), capture_output=True, text=True)
    assert result.returncode == 1
    assert "train: invalid parameters" in result.stderr and "rendezvous.endpoint: required with train.nnodes=2" \
        in result.stderr, result.stderr
    assert "torch.distributed" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_to_dvc_repro_stops_the_launcher_and_every_worker(tmp_path):
    """DVC exits on SIGTERM without stopping its command: the launcher notices and torchrun stops its workers.
    DVC runs its command with $SHELL -c: /bin/sh (dash) keeps the launcher as its child, so the launcher
    watches DVC itself (bash execs the command, and the launcher's parent-death signal suffices)."""
    from conftest import copy_repo, write_params

    repo = copy_repo(tmp_path / "repo")
    write_params(repo, tiny_params(methods=["udddm"], finetune={"methods": []}, train={"epochs": 500, "nproc": 2}))
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@udddm"], cwd=repo,
                           env=run_env(SHELL="/bin/sh"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((repo / "checkpoints").glob("udddm-*/history.jsonl")):
        assert dvc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    tree = psutil.Process(dvc.pid).children(recursive=True)
    assert sum("-m pipeline.train" in " ".join(p.cmdline()) for p in tree) == 2, tree  # the two workers
    dvc.terminate()
    dvc.wait(30)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"still running 10 s after SIGTERM to dvc: {[(p.pid, p.cmdline()) for p in alive]}"
