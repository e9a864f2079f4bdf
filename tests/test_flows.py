"""Prefect flows and deployments against real servers on loopback: a Prefect server, an MLflow tracking
server, the deployments served from a repository copy (`python -m flows.deploy`), runs triggered through
the Prefect client. Also the registry rule (alias moves only on a better score) against MLflow directly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import dvc_run, free_port, run_env, start_mlflow_server, tiny_params, tiny_repo, write_params
from flows.dvcrun import expanded_stages


pytestmark = pytest.mark.slow

QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
         "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
# what the README's `prefect server start` sets, so that `prefect deployment run --watch` shows the logs
LOGS_TO_WATCH = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true", "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}
# kept by a failed flow's rollback (README, "Scheduling runs with Prefect"): caches, not results
CACHES = (".git", ".dvc/cache", ".dvc/tmp", "checkpoints")


def start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A process in its own process group, so stopping it stops its children (uvicorn, flow runs)."""
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL to whatever of it is left."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up:\n" + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def mlflow_process(tmp_path_factory):
    """(the server's process, its URI): a test stops it with SIGSTOP (a server starved of CPU) and goes on."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), free_port(), **QUIET)
    try:
        yield proc, uri
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        stop(proc)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_process):
    return mlflow_process[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = run_env(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
                  **QUIET, **LOGS_TO_WATCH)
    proc = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 home / "server.log", env=env)
    try:
        wait_http(api + "/health", proc, home / "server.log")
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    finally:
        stop(proc)


@contextmanager
def prefect_client(settings: dict):
    """A Prefect client of the test's server (its settings hold while the client is used)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: settings["PREFECT_API_URL"], PREFECT_HOME: settings["PREFECT_HOME"]}):
        with get_client(sync_client=True) as client:
            yield client


def trigger(client, name: str, parameters: dict, serve_log: Path, timeout: float = 300):
    """Create a flow run of deployment `name` and wait until it is final."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, client=client, parameters=parameters, timeout=0, as_subflow=False)
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run.name} not final after {timeout} s: {run.state}\n"
                         + serve_log.read_text()[-4000:])


def logs_of(client, flow_run_id, until: str | None = None, timeout: float = 30, settle_s: float = 0) -> str:
    """All log messages of a flow run (its tasks' included); waits a little for `until` to arrive, then
    until no message has come for `settle_s` (the engine's last lines follow the final state)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.time() + timeout
    while True:
        messages, offset = [], 0
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=offset, sort=LogSort.TIMESTAMP_ASC)
            messages += [log.message for log in page]
            offset += len(page)
            if len(page) < 200:
                break
        text = "\n".join(messages)
        if until is None or until in text or time.time() > deadline:
            break
        time.sleep(1)
    while settle_s:  # the run has finished: its logs stop
        time.sleep(settle_s)
        later = logs_of(client, flow_run_id)
        if later == text:
            break
        text = later
    return text


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(repo: Path) -> dict[str, str]:
    """Every file of the workspace but the CACHES and bytecode, with its sha256."""
    return {str(p.relative_to(repo)): digest(p) for p in sorted(repo.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and not str(p.relative_to(repo)).startswith(CACHES)}


def watch(settings: dict, deployment: str, overrides: dict) -> tuple[str, str]:
    """`prefect deployment run DEPLOYMENT --param overrides=... --watch`, as the README triggers a run: (its
    output, the flow run's id)."""
    done = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", deployment, "--param",
                           f"overrides={json.dumps(overrides)}", "--watch"],
                          env=run_env(**settings, **QUIET, COLUMNS="1000"), capture_output=True, text=True, timeout=600)
    return done.stdout + done.stderr, re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)[1]


@contextmanager
def killed_when_started(module: str, cwd: Path):
    """SIGKILL to the process that runs `python -m <module>` in `cwd` as soon as it starts (an OOM kill or a
    preemption of that stage), from a thread, while the body runs."""
    stop_looking = threading.Event()

    def look() -> None:
        while not stop_looking.is_set():
            for proc in psutil.process_iter(["cmdline", "cwd"]):
                if module in (proc.info["cmdline"] or []) and proc.info["cwd"] == str(cwd):
                    proc.kill()
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop_looking.set()
        thread.join()


def artifact(api: str, key: str, flow_run_id) -> str:
    """The markdown of a flow run's artifact (this Prefect client's read_artifacts sends nulls that the
    server rejects, so ask the REST API directly)."""
    found = httpx.post(api + "/artifacts/filter", json={"artifacts": {
        "key": {"any_": [key]}, "flow_run_id": {"any_": [str(flow_run_id)]}}}).json()
    assert len(found) == 1, found
    return found[0]["data"]


def dvc(repo: Path, *args: str) -> str:
    result = dvc_run(repo, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def latest_evaluation(client, training_run):
    """The newest evaluation (score stage) run nested under a training run."""
    return client.search_runs([training_run.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{training_run.info.run_id}'",
                              order_by=["attributes.start_time DESC"])[0]


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory, prefect_server, mlflow_server):
    """The deployments served from a committed repository copy with tiny params, two methods (the flows run
    each stage of the graph alike; test_pipeline runs every method), its data stages done, for the module's
    flow runs one after the other; yields (repo, client, log)."""
    repo_copy = tiny_repo(tiny_data, tmp_path_factory.mktemp("served") / "repo")
    # no learning curves (test_pipeline's): about 1.5 s of each train stage
    write_params(repo_copy, tiny_params(methods=["udddm", "edm"], finetune={"methods": []}, train={"eval_every": 0}))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo_copy, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=repo_copy, check=True)  # DVC experiments need a commit
    log = repo_copy.parent / "serve.log"
    env = run_env(**prefect_server, **QUIET, MLFLOW_TRACKING_URI=mlflow_server, PREFECT_RUNNER_POLL_FREQUENCY="2",
                  UDDDM_NIGHTLY_CRON=NIGHTLY)
    proc = start([sys.executable, "-m", "flows.deploy"], log, cwd=repo_copy, env=env)
    try:
        with prefect_client(prefect_server) as client:
            deadline = time.time() + 120
            while True:
                try:
                    deployments = {n: client.read_deployment_by_name(n) for n in DEPLOYMENTS}
                    break
                except Exception:
                    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
            assert [s.schedule.cron for s in deployments["udddm-experiment/nightly"].schedules] == [NIGHTLY]
            assert not deployments["udddm-experiment/default"].schedules
            yield repo_copy, client, log
    finally:
        stop(proc)


NIGHTLY = "0 3 1 1 *"  # far from any test run
DEPLOYMENTS = ("udddm-experiment/default", "udddm-experiment/nightly", "udddm-sweep/sweep", "udddm-sweep/study")


def test_served_deployments_run_register_roll_back_and_sweep(served, prefect_server, mlflow_server):
    from mlflow.tracking import MlflowClient

    repo, client, serve_log = served
    api = prefect_server["PREFECT_API_URL"]
    mlflow = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    # `default` with a tiny config (params.yaml) and an override applied through DVC's -S mechanism
    run = trigger(client, "udddm-experiment/default", {"overrides": {"sample.num_samples": 150}}, serve_log)
    logs = logs_of(client, run.id, until="Finished in state", settle_s=3)
    assert run.state.is_completed(), f"{run.state}\n{logs[-4000:]}"
    # 76 lines on 2026-12-07: nothing per step, DVC's repeated lines condensed (the train stage's do not grow
    # with the epochs: tests/test_logs.py)
    assert len(logs.splitlines()) <= 100, logs
    assert "Running stage 'train@udddm'" in logs and "> python -m pipeline.score" in logs  # stage output streamed
    for path in ("out/train/udddm/model.pt", "out/samples/udddm/1-step.npz", "out/samples/edm/4-step.npz",
                 "out/score/edm/metrics.json", "out/compare/table.md"):
        assert (repo / path).is_file(), path
    assert "num_samples: 150" in (repo / "params.yaml").read_text()
    assert "up to date" in dvc(repo, "status")  # dvc.lock describes the workspace: lineage kept
    assert any(e.startswith(run.name) for e in dvc(repo, "exp", "list", "--name-only").split())

    metrics = json.loads((repo / "out/score/udddm/metrics.json").read_text())
    reference = json.loads((repo / "out/train/udddm/mlflow_run.json").read_text())
    assert reference["tracking_uri"] == mlflow_server
    mlrun = mlflow.get_run(reference["run_id"])
    # the run names the DVC experiment and the Prefect flow run that made it
    assert mlrun.data.tags["dvc_experiment"].startswith(run.name) and mlrun.data.tags["prefect_flow_run_id"] == str(run.id)
    assert "Stage 'check' didn't change" not in logs and "git add dvc.lock" not in logs  # DVC's lines condensed
    evaluation = latest_evaluation(mlflow, mlrun)  # the scores: a child run of the training run
    for row in ("nfe1", "nfe2"):
        for key in ("fid_classifier", "precision", "recall", "classes"):
            assert evaluation.data.metrics[f"{row}/{key}"] == pytest.approx(metrics[row][key])
    models = mlflow.search_logged_models([mlrun.info.experiment_id])
    assert any(m.source_run_id == mlrun.info.run_id and m.name == "ema_model" for m in models)
    champion = mlflow.get_model_version_by_alias("udddm-digits", "champion")
    assert champion.run_id == mlrun.info.run_id
    assert champion.tags["metric"] == "nfe1/fid_classifier"
    assert float(champion.tags["score"]) == pytest.approx(metrics["nfe1"]["fid_classifier"])
    table = artifact(api, "udddm-scores", run.id)
    assert "fid_classifier" in table and "| udddm nfe2 |" in table and "| edm nfe7 |" in table
    run_page = f"{mlflow_server}/#/experiments/{mlrun.info.experiment_id}/runs/{mlrun.info.run_id}" \
        "?workflowType=machine_learning"  # opens in MLflow's model-training layout
    assert run_page in table
    assert artifact(api, "udddm-mlflow-run", run.id) == f"[MLflow run of udddm]({run_page})"  # a link artifact
    rows = json.loads(artifact(api, "udddm-scores-table", run.id))  # a table artifact: one row per method and row
    by_row = {(r["method"], r["row"]): r for r in rows}
    assert by_row["udddm", "nfe1"]["fid_classifier"] == pytest.approx(metrics["nfe1"]["fid_classifier"])
    assert ("edm", "nfe7") in by_row and ("edm", "untrained") in by_row

    # a bad parameter, triggered as the README does: the reason is one line of what `--watch` prints, the
    # flow run's state message, and the workspace stays as it was
    before = tree(repo)
    printed, bad_id = watch(prefect_server, "udddm-experiment/default", {"train.lr": -1})
    bad = client.read_flow_run(bad_id)
    assert bad.state.is_failed(), bad.state
    reason = "bad override: params.yaml with the -S overrides: train.lr: Input should be greater than 0 (got -1)"
    assert bad.state.message == reason, bad.state.message  # validated before any stage runs
    assert reason in printed and "Flow run finished in state 'Failed'" in printed, printed[-4000:]
    logs = logs_of(client, bad.id, until="Finished in state Failed", settle_s=5)
    assert "Traceback" not in logs + printed and "Running stage" not in logs, logs[-4000:]
    assert "Retry 1/" not in logs  # a bad parameter is not retried (Prefect logs "Retry 1/2 will start ...")
    assert tree(repo) == before
    assert mlflow.get_model_version_by_alias("udddm-digits", "champion").version == champion.version

    # a run that fails at its last stage (register killed, as by the OOM killer), after a new method's stages
    # and the comparison ran: the workspace is as before, byte for byte, the new method's outputs gone
    with killed_when_started("pipeline.register", repo):
        late = trigger(client, "udddm-experiment/default", {"overrides": {"methods": ["udddm", "edm", "ict"]},
                                                            "stage_retries": 0}, serve_log)
    logs = logs_of(client, late.id, until="Finished in state Failed", settle_s=5)
    assert late.state.is_failed() and "stage register failed (exit status" in late.state.message, late.state
    # -9 where DVC's shell ($SHELL, bash) execs the command, 137 where /bin/sh (dash, no $SHELL: CI) forks it
    assert re.search(r"exited with (-9|137)\b", late.state.message), late.state.message
    assert "score: " not in late.state.message  # the stage that failed, not an earlier one
    assert "Running stage 'compare'" in logs and "Running stage 'train@ict'" in logs, logs[-4000:]
    assert tree(repo) == before
    assert not (repo / "out/train/ict").exists()

    # `sweep` over uDDDM's loss: one point retrains uDDDM, the other is the run above (DVC's run-cache)
    sweep = trigger(client, "udddm-sweep/sweep", {"grid": {"method.udddm.metric": ["l2", "pseudo_huber"]}}, serve_log)
    assert sweep.state.is_completed(), logs_of(client, sweep.id)[-4000:]
    table = artifact(api, "udddm-sweep", sweep.id)
    assert '| "l2" |' in table and '| "pseudo_huber" |' in table and table.count("**best**") == 1
    assert len(dvc(repo, "exp", "list", "--name-only").split()) == 3
    l2_run = next(r for r in mlflow.search_runs([mlrun.info.experiment_id])
                  if r.data.params.get("method.udddm.metric") == "l2")
    score = {r.info.run_id: latest_evaluation(mlflow, r).data.metrics["nfe1/fid_classifier"] for r in (mlrun, l2_run)}
    expected = min(score, key=score.get)  # lower is better; a tie keeps the champion
    if score[l2_run.info.run_id] == score[mlrun.info.run_id]:
        expected = mlrun.info.run_id
    assert mlflow.get_model_version_by_alias("udddm-digits", "champion").run_id == expected
    parent = mlflow.get_run(l2_run.info.run_id).data.tags["mlflow.parentRunId"]  # the sweep groups its runs
    assert mlflow.get_run(parent).data.tags["sweep"].startswith("sweep ")
    assert "### " in table and "| edm nfe7 |" in table  # every method's scores per point
    assert "up to date" in dvc(repo, "status")


def test_a_tracking_server_that_stops_answering_during_training_costs_no_run(served, mlflow_process):
    """The issue's trial: the MLflow server stops answering (SIGSTOP: a server starved of CPU) while a served
    flow trains, and answers again once the train stage has ended. The flow completes: the register stage
    logs into the run what the outage kept from it (its metrics, the model), then registers it. With the
    server away at register time, the stage registers nothing, says so in one line, and succeeds."""
    from mlflow.tracking import MlflowClient

    from prefect.deployments import run_deployment

    repo, client, serve_log = served
    server, uri = mlflow_process
    run = run_deployment("udddm-experiment/default", client=client, timeout=0, as_subflow=False,
                         parameters={"overrides": {"methods": ["udddm"], "train.epochs": 4, "train.batch_size": 64}})
    mlflow, reference = MlflowClient(uri), repo / "out/train/udddm/mlflow_run.json"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not client.read_flow_run(run.id).state.is_final():  # a loss logged
            runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                      "attributes.start_time > 0", order_by=["attributes.start_time DESC"])
            if runs and runs[0].data.params.get("train.epochs") == "4" and "loss" in runs[0].data.metrics:
                break
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGSTOP)
        while time.time() < deadline and "incomplete" not in (reference.read_text() if reference.is_file() else ""):
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    incomplete = json.loads(reference.read_text())["incomplete"]
    assert "queued metrics" in incomplete and "the model ema_model" in incomplete, incomplete
    while not (run := client.read_flow_run(run.id)).state.is_final() and time.time() < deadline:
        time.sleep(2)
    logs = logs_of(client, run.id, until="Finished in state")
    assert run.state.is_completed(), f"{run.state}\n{logs[-4000:]}"
    run_id = json.loads(reference.read_text())["run_id"]
    assert f"MLflow run {run_id} is incomplete" in logs
    # the metrics only where the stopped server had not taken them in: a batch whose request timed out sat in its
    # socket and is processed once it runs again (tests/test_tracking.py tests that the missing steps are logged)
    assert re.search(rf"register: udddm: logged into MLflow run {run_id} what a tracking outage kept from it: "
                     r"(\d+ metrics, )?the model ema_model", logs), logs[-4000:]
    steps = len((repo / "out/train/udddm/loss.tsv").read_text().splitlines()) - 1
    assert sorted(m.step for m in mlflow.get_metric_history(run_id, "loss")) == list(range(1, steps + 1))
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert any(v.run_id == run_id for v in mlflow.search_model_versions("name = 'udddm-digits'"))

    # the register stage while the server does not answer: one line naming the run and the later command
    register = expanded_stages(repo)["register"]["cmd"].split()
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        done = subprocess.run([sys.executable, *register[1:-1], str(repo.parent / "registry.json")], cwd=repo,
                              env=run_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.splitlines()
    assert line.startswith(f"register: WARNING: udddm: MLflow run {run_id} not registered: MLflow tracking server "
                           f"{uri} is unreachable (") and line.endswith("`dvc repro -f register` registers it"), line
    assert "not_registered" in json.loads((repo.parent / "registry.json").read_text())["registered"]["udddm"]


def test_nightly_schedule_creates_runs(prefect_server):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.deploy import deployments, log_streaming_problem

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"],
                             PREFECT_HOME: prefect_server["PREFECT_HOME"]}):
        assert log_streaming_problem() is None  # started as the README says: `--watch` prints the log lines
        nightly = next(d for d in deployments() if d.name == "nightly")
        nightly.name, nightly.paused = "nightly-schedule-check", False  # not the served one (paused when served stops)
        deployment_id = nightly.apply()
    deadline, count = time.time() + 45, 0
    while time.time() < deadline and not count:
        time.sleep(2)
        count = httpx.post(prefect_server["PREFECT_API_URL"] + "/flow_runs/count",
                           json={"deployments": {"id": {"any_": [str(deployment_id)]}}}).json()
    assert count > 0


def test_registry_moves_the_alias_only_on_a_better_score(tmp_path):
    import mlflow
    import torch

    from dddm.registry import is_better, lower_is_better, register_if_better

    assert lower_is_better("udddm/nfe1/fid_classifier") and lower_is_better("edm/nfe35/kid")
    assert not lower_is_better("ict/nfe1/precision") and not lower_is_better("udddm/nfe1/is")
    with pytest.raises(ValueError, match="no known direction"):
        lower_is_better("udddm/nfe1/loss")
    assert is_better(1.0, 2.0, "fid") and not is_better(2.0, 2.0, "fid") and is_better(0.9, 0.8, "recall")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")

    def logged_run(fid: float, recall: float) -> str:
        with mlflow.start_run() as run:
            mlflow.log_metrics({"1-step/fid_classifier": fid, "1-step/recall": recall})
            mlflow.pytorch.log_model(torch.nn.Linear(1, 1), name="ema_model", serialization_format="pickle",
                                     pip_requirements=["torch"])
        return run.info.run_id

    first, worse, better = logged_run(5.0, 0.5), logged_run(7.0, 0.9), logged_run(3.0, 0.1)
    name, metric = "udddm-test", "1-step/fid_classifier"
    r1 = register_if_better(uri, first, name, metric)
    assert r1["moved"] and r1["version"] == "1"
    r2 = register_if_better(uri, worse, name, metric)
    assert not r2["moved"] and r2["version"] == "2" and r2["previous_version"] == "1"
    r3 = register_if_better(uri, better, name, metric)
    assert r3["moved"] and r3["previous_score"] == 5.0
    again = register_if_better(uri, better, name, metric)  # the same run is registered once
    assert again["version"] == r3["version"] and not again["moved"]
    client = mlflow.MlflowClient(uri)
    assert client.get_model_version_by_alias(name, "champion").run_id == better
    assert client.get_model_version(name, "2").tags == {"metric": metric, "score": "7.0", "better": "lower"}
    # higher is better for recall: under its own alias, the run with 0.9 wins
    for run_id in (first, worse, better):
        register_if_better(uri, run_id, name, "1-step/recall", alias="best-recall")
    assert client.get_model_version_by_alias(name, "best-recall").run_id == worse
    with pytest.raises(ValueError, match="no metric"):
        register_if_better(uri, first, name, "4-step/fid_classifier")
    # an explicit score (the experiment's metrics.json) is what is compared, and what the tags record
    assert not register_if_better(uri, first, name, metric, score=3.0)["moved"]  # a tie keeps the champion
    moved = register_if_better(uri, first, name, metric, score=2.5)
    assert moved["moved"] and moved["previous_score"] == 3.0 and moved["version"] == "1"
    assert client.get_model_version(name, "1").tags["score"] == "2.5"


def test_an_override_of_a_key_params_yaml_lacks_is_named_with_the_nearest_key():
    from flows.dvcrun import check_override_keys

    params = {"train": {"epochs": 3, "lr": 0.1}, "method": {"udddm": {"process": "ve"}}}
    check_override_keys(params, {"train.epochs": 2, "method.udddm.process": "vp"})
    with pytest.raises(ValueError, match=r"train.epoch is not a key of params.yaml; did you mean train.epochs\?"):
        check_override_keys(params, {"train.epoch": 2})  # DVC itself would advise `+train.epoch`
    with pytest.raises(ValueError, match=r"trian.epochs is not a key of params.yaml; did you mean train\?"):
        check_override_keys(params, {"trian.epochs": 2})
    with pytest.raises(ValueError, match=r"train.epochs.x is not a key of params.yaml; train.epochs has no keys"):
        check_override_keys(params, {"train.epochs.x": 2})


def test_study_points_become_one_comparison_table():
    from flows.sweep import STUDY_POINTS, comparison_table, points_grid

    grid = points_grid(STUDY_POINTS)
    assert list(grid) == ["method.udddm.process", "method.udddm.processes.ve.sigma_max",
                          "method.udddm.estimates_from", "method.udddm.n_counts", "methods", "finetune.methods",
                          "train.epochs"]
    assert grid["method.udddm.process"] == [None, "vp"] + [None] * (len(STUDY_POINTS) - 2)
    metrics = {"udddm": {"nfe1": {"fid_classifier": 1469.0, "precision": 0.01, "recall": 0.0}}}
    rows = [(point, {"metrics": metrics, "experiment": f"e{i}"}) for i, point in enumerate(STUDY_POINTS)]
    rows[3] = (STUDY_POINTS[3], None)  # a failed point
    table = comparison_table(grid, rows, "udddm/nfe1/fid_classifier", rows[0][1])
    lines = table.splitlines()
    assert len(lines) == 2 + len(STUDY_POINTS)
    assert lines[2].startswith("| **best** | null | null | null | null | null | null | null | 1469")
    assert '| "data" |' in lines[5] and lines[5].startswith("| failed |")
