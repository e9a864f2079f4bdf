"""Workers on "other machines", rehearsed on one: prefect.yaml's work-pool deployments, two Prefect workers
started in two more clones of the repository, real Prefect and MLflow servers on 127.0.0.1, a shared-directory
DVC remote and a bare git repository as the remotes every clone reaches. The triggering clone has run the data
stages and pushed their outputs; the workers' clones pull them (the flow's `dvc repro --pull`) instead of
making them again."""

import json
import re
import subprocess
import sys

import pytest

from conftest import NO_MLFLOW_MODEL, run_env, tiny_params, tiny_repo, write_params
from test_flows import (QUIET, logs_of, mlflow_process, mlflow_server, prefect_client, prefect_server,  # noqa: F401
                        start, stop)

pytestmark = pytest.mark.slow
POINTS = [{"method.udddm.metric": "l2"}, {"method.udddm.metric": "pseudo_huber"}]
# the sweep flow as a user starts it in their clone (the points go to the pool's workers); prints its final state
SWEEP = """
import json, sys
from flows.sweep import sweep
state = sweep(points=json.loads(sys.argv[1]), concurrency=2, deployment="udddm-experiment/pool", registry=False,
              repo=".", return_state=True)
print(state.type.value)
"""


def sh(cmd, cwd, env=None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env or run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def test_a_sweep_across_the_pool_runs_two_points_at_once_on_workers_in_other_clones_into_the_shared_servers(
        tiny_data, tmp_path, prefect_server, mlflow_server):
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    here = tiny_repo(tiny_data, tmp_path / "a")  # the clone that deploys and triggers, its data stages run
    write_params(here, tiny_params(methods=["udddm"], finetune={"methods": []}, train={"eval_every": 0},
                                   tracking=NO_MLFLOW_MODEL))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], here)
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    sh(["git", "remote", "add", "origin", str(origin)], here)
    sh(["git", "add", "-A"], here)
    sh([*git, "commit", "-qm", "tiny"], here)
    sh(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], here)
    sh([sys.executable, "-m", "dvc", "push"], here)  # the data stages' outputs, for the workers' clones to pull
    commit = sh(["git", "rev-parse", "HEAD"], here).strip()

    env = run_env(**prefect_server, **QUIET, MLFLOW_TRACKING_URI=mlflow_server)
    sh([sys.executable, "-m", "prefect", "work-pool", "create", "udddm", "--type", "process"], here, env)
    sh([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], here,
       env | {"DDDM_GIT_URL": str(origin), "DDDM_GIT_COMMIT": commit})
    workers = []
    try:
        for name in ("b", "c"):
            clone = tmp_path / name
            sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
            workers.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "udddm", "--limit", "1",
                                  "--name", f"worker-{name}"], tmp_path / f"worker-{name}.log", cwd=clone,
                                 env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}))
        # the sweep, started here, runs each point as a flow run of the pool deployment, two at a time
        swept = subprocess.run([sys.executable, "-c", SWEEP, json.dumps(POINTS)], cwd=here, env=env, capture_output=True,
                               text=True, timeout=900)
        logs = "".join((tmp_path / f"worker-{n}.log").read_text()[-3000:] for n in "bc")
        assert swept.returncode == 0 and swept.stdout.split()[-1] == "COMPLETED", swept.stdout[-3000:] + \
            swept.stderr[-3000:] + logs
        with prefect_client(prefect_server) as client:
            deployment = client.read_deployment_by_name("udddm-experiment/pool")
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    finally:
        for worker in workers:
            stop(worker)

    # two points at once, one on each worker; each clone pulled the data stages' outputs instead of making them
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs), [r.state for r in runs]
    with prefect_client(prefect_server) as client:
        for run in runs:
            logs = logs_of(client, run.id, until="Running stage 'register'")
            assert "Running stage 'train@udddm'" in logs and "Pulling data for stage: 'reference'" in logs, logs[-3000:]
            assert not re.search(r"Running stage '(prepare|classifier|reference)'", logs), logs[-3000:]
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, (first.start_time, first.end_time, second.start_time)
    took = [{r.name for r in runs if f"Flow run '{r.name}'" in (tmp_path / f"worker-{n}.log").read_text()}
            for n in "bc"]
    assert sorted(map(len, took)) == [1, 1] and took[0] != took[1], took

    # both training runs in the shared MLflow server, tagged with the commit and the host, grouped under the sweep
    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("udddm-digits").experiment_id])
    [parent] = [r.info.run_id for r in runs if r.data.tags.get("sweep")]
    trained = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.params["method.udddm.metric"] for r in trained) == ["l2", "pseudo_huber"]
    assert all(r.data.tags["mlflow.source.git.commit"] == commit and r.data.tags["host"] for r in trained)

    # the sweep pulled both experiments the workers pushed; the first clone applies one: its params, its model
    names = sh([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], here).split()
    assert len(names) == 2, names
    sh([sys.executable, "-m", "dvc", "exp", "apply", names[0]], here)
    assert (here / "out/train/udddm/model.pt").is_file() and (here / "out/score/udddm/metrics.json").is_file()
    assert "up to date" in sh([sys.executable, "-m", "dvc", "status"], here)
