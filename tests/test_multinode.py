"""Several nodes rehearsed on one machine: torchrun agents started as the train stage starts them
(`python -m pipeline.launch pipeline.train ...`, one per "node", 1 gloo process each) meet at a c10d
rendezvous on 127.0.0.1; a kill -9 of one agent, the rerun, a node that never comes, bad params."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import NO_MLFLOW_MODEL, ROOT, free_port, run_env, tiny_params, write_params
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
        tracking={"experiment": name, **NO_MLFLOW_MODEL})))
    return path


def launch(shared, params_file: Path, out: Path, log: Path) -> subprocess.Popen:
    """An agent as a user starts it: without the suite's OMP_NUM_THREADS (train.threads: auto decides)."""
    root, uri = shared
    env = run_env(DDDM_PARAMS=str(params_file), MLFLOW_TRACKING_URI=uri)
    env.pop("OMP_NUM_THREADS")
    return subprocess.Popen([*LAUNCH, "--prepared", str(root / "prepared.arrow"), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def finish(agents, logs, timeout=300) -> None:
    for agent, log in zip(agents, logs):
        assert agent.wait(timeout) == 0, log.read_text()[-4000:]


def weights_sha256(out: Path) -> str:
    return torch.load(out / "udddm" / "model.pt", weights_only=True)["weights_sha256"]


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
    client = mlflow.MlflowClient(shared[1])
    runs, (single,) = (client.search_runs([client.get_experiment_by_name(name).experiment_id])
                       for name in ("two-nodes", "one-node"))
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    # the cores shared by the two processes on this machine, whichever way they are split
    threads = str(max(1, min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False)) // 2))
    assert runs[0].data.params["train.threads"] == single.data.params["train.threads"] == threads
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
    assert "each other of the train.nnodes=2 nodes `python -m pipeline.follow`" in text


@pytest.mark.slow
def test_an_endpoint_another_server_holds_fails_within_the_timeout_naming_it(tmp_path, shared):
    """torch's store client waits without a limit on a server that accepts its connection and never answers
    (651 s with rendezvous.timeout 30): the launcher tests the endpoint first."""
    pfile = params(tmp_path, "held", nproc=1, nnodes=2, timeout=3)
    endpoint = yaml.safe_load(pfile.read_text())["rendezvous"]["endpoint"]
    host, port = endpoint.rsplit(":", 1)
    out, log = tmp_path / "out", tmp_path / "held.log"
    with socket.create_server((host, int(port))):  # listens, accepts (the kernel's backlog), never answers
        start = time.time()
        agent = launch(shared, pfile, out, log)
        try:
            rc = agent.wait(60)
        finally:
            agent.kill()
        took = time.time() - start
    text = log.read_text()
    assert rc == 1 and took < 3 + 15, (took, text)  # the timeout, a 2 s grace, the imports
    assert text.strip().splitlines()[-1] == (
        f"train: rendezvous.endpoint {endpoint}: something accepts connections there but does not answer as a "
        "torchrun rendezvous within rendezvous.timeout=3 s (another program holds the port?); choose a free port")
    assert "Traceback" not in text and not processes_of(out) and not out.exists()


@pytest.mark.slow
def test_a_stopped_rank_fails_the_others_within_the_timeout_naming_it(tmp_path, shared):
    """A rank SIGSTOPped: the others' collective waits rendezvous.timeout (not torch's 30 minutes), rank 0 names
    rank 1 in one line, and the launcher ends the stopped worker at once (torchrun's SIGTERM would wait for it)."""
    pfile = params(tmp_path, "stopped", nproc=2, nnodes=1, timeout=3)
    raw = yaml.safe_load(pfile.read_text())
    raw["train"]["epochs"] = 1000  # still training when stopped
    pfile.write_text(yaml.safe_dump(raw))
    out, log = tmp_path / "out", tmp_path / "stopped.log"
    agent = launch(shared, pfile, out, log)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "stopped" / "checkpoints").glob("*/history.jsonl")):
            assert agent.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        [stopped] = [p for p in processes_of(out) if p.environ().get("RANK") == "1"]
        stopped.suspend()
        start = time.time()
        rc = agent.wait(60)
        took = time.time() - start
    finally:
        agent.kill()
    text = log.read_text()
    assert rc == 1 and took < 3 + 15, (took, text)  # the timeout, the others' check-in (5 s), the shutdown
    assert ("train: rank 0 of 2: a collective waited rendezvous.timeout=3 s for rank(s) 1, which did not answer "
            "(stopped, hung, or its node lost)") in text, text
    assert text.strip().splitlines()[-1].startswith("train: stopped: rank 0 (pid "), text
    assert "Traceback" not in text and not processes_of(out)


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
def test_sigterm_to_dvc_repro_stops_the_launcher_and_every_worker(tiny_copy):
    """DVC exits on SIGTERM without stopping its command: the launcher notices and torchrun stops its workers.
    DVC runs its command with $SHELL -c: /bin/sh (dash) keeps the launcher as its child, so the launcher
    watches DVC itself (bash execs the command, and the launcher's parent-death signal suffices)."""
    repo = tiny_copy
    write_params(repo, tiny_params(methods=["udddm"], finetune={"methods": []}, train={"epochs": 500, "nproc": 2},
                                   tracking=NO_MLFLOW_MODEL))
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


@pytest.mark.slow
def test_node_0_runs_dvc_repro_and_the_other_node_follows_with_one_command(tmp_path, tiny_copy):
    """The README's two commands: `dvc repro` on node 0, `python -m pipeline.follow` on the other, started at
    once; the follower waits for node 0 to pass check/prepare/classifier, joins the train stage with dvc.yaml's
    command, and a second follower finds nothing to run."""
    repo = tiny_copy
    write_params(repo, tiny_params(
        methods=["udddm"], finetune={"methods": []}, score={"untrained_baseline": False},
        train={"epochs": 2, "batch_size": 128, "nnodes": 2, "eval_every": 0}, tracking=NO_MLFLOW_MODEL,
        rendezvous={"endpoint": f"127.0.0.1:{free_port()}", "id": "follow", "timeout": 120}))
    env = run_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("OMP_NUM_THREADS")
    follower = subprocess.Popen([sys.executable, "-m", "pipeline.follow"], cwd=repo, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    node0 = subprocess.run([sys.executable, "-m", "dvc", "repro", "train@udddm"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=600)
    followed = follower.communicate(timeout=120)[0]
    assert node0.returncode == 0, node0.stdout[-3000:] + node0.stderr[-3000:] + followed[-3000:]
    assert follower.returncode == 0, followed[-3000:]
    assert "follow: train@udddm: joining node 0: python -m pipeline.launch pipeline.train --prepared" in followed
    assert "follow: done, 1 of 1 train stages run here" in followed
    assert torch.load(repo / "out/train/udddm/model.pt", weights_only=True)["dataset"]["num_samples"] == 1797

    again = subprocess.run([sys.executable, "-m", "pipeline.follow"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "follow: train@udddm: up to date, node 0 skips it" in again.stdout, again


def test_the_follower_refuses_a_single_node_run(tmp_path):
    pfile = params(tmp_path, "single", nproc=1, nnodes=1)
    done = subprocess.run([sys.executable, "-m", "pipeline.follow"], cwd=ROOT, env=run_env(DDDM_PARAMS=str(pfile)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "follow: train.nnodes is 1" in done.stderr, done.stderr
