"""Screenshots of what a user browses: the MLflow run page, the registered model version, a Prefect flow
run. Runs a small experiment through the Prefect flow (a copy of this repository, 3 epochs) against an
MLflow server and a Prefect server on loopback, then photographs their pages with headless Chromium
(`apt-get install chromium` on Debian; `make screenshots` installs it).

    python docs/screenshots.py [--out docs/img]   # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train": {"epochs": 3}, "sample": {"num_samples": 256}, "score": {"classifier_epochs": 2},
         "tracking": {"grid_every_epochs": 1}, "sampler": {"edm": {"steps": [6]}}}
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def merge(base: dict, over: dict) -> dict:
    return {k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in {**base, **over}.items()}


def copy_repository(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("out/", "data/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = merge(yaml.safe_load((dest / "params.yaml").read_text()), SMALL)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=screenshots", "-c", "user.email=screenshots@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "small"], cwd=dest, check=True)
    return dest


def photograph(url: str, path: Path, width: int = 1500, height: int = 1000, budget_ms: int = 60000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("screenshots: no Chromium found (Debian: apt-get install chromium; or `make screenshots`)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path}: {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlflow_port, prefect_port = free_port(), free_port()
        mlflow_uri, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        env = dict(os.environ, **QUIET, PREFECT_HOME=str(tmp / "prefect"), PREFECT_API_URL=prefect_api,
                   MLFLOW_TRACKING_URI=mlflow_uri)
        log = open(tmp / "servers.log", "w")
        servers = [
            subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                              str(mlflow_port), "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                              "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
                             env=env, stdout=log, stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                              str(prefect_port)], env=env, stdout=log, stderr=subprocess.STDOUT)]
        try:
            wait_for(mlflow_uri + "/health", servers[0])
            wait_for(prefect_api + "/health", servers[1])
            repo = copy_repository(tmp / "repo")
            run = subprocess.run(
                [sys.executable, "-c", "import json, sys; from flows.experiment import experiment; "
                 "print(json.dumps({'run_id': experiment(repo=sys.argv[1])['run_id']}))", str(repo)],
                cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=1800)
            if run.returncode:
                raise SystemExit(f"screenshots: the experiment flow failed:\n{run.stderr[-3000:]}")
            from mlflow.tracking import MlflowClient
            from prefect.client.orchestration import get_client

            client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
            run_id = yaml.safe_load(run.stdout.splitlines()[-1])["run_id"]
            experiment_id = client.get_run(run_id).info.experiment_id
            version = client.get_model_version_by_alias("udddm-digits", "champion").version
            os.environ.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp / "prefect"))
            with get_client(sync_client=True) as prefect:
                [flow_run] = prefect.read_flow_runs(limit=1)
                table = next(a for a in prefect.read_artifacts() if a.type == "table")
            run_page = f"{mlflow_uri}/#/experiments/{experiment_id}/runs/{run_id}"
            [evaluation] = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
            [model] = [m for m in client.search_logged_models([experiment_id]) if m.source_run_id == run_id]
            shots = {
                # the experiment as model training: its runs, each with its headline score (fid_classifier)
                "mlflow-experiment.png": (f"{mlflow_uri}/#/experiments/{experiment_id}/runs", 1000),
                "mlflow-run.png": (run_page, 1800),  # name, source, user, commit, dataset, tags, child run, model
                "mlflow-evaluation-samples.png":  # the scoring's own child run: its sample grid
                    (f"{mlflow_uri}/#/experiments/{experiment_id}/runs/{evaluation.info.run_id}/artifacts/"
                     "samples/1-step.png", 1000),
                "mlflow-model.png": (f"{mlflow_uri}/#/experiments/{experiment_id}/models/{model.model_id}", 1400),
                "mlflow-registry.png": (f"{mlflow_uri}/#/models/udddm-digits/versions/{version}", 1000),
                "prefect-flow-run.png": (f"http://127.0.0.1:{prefect_port}/runs/flow-run/{flow_run.id}", 1000),
                "prefect-score-table.png": (f"http://127.0.0.1:{prefect_port}/artifacts/artifact/{table.id}", 1000),
            }
            for name, (url, height) in shots.items():
                photograph(url, args.out / name, height=height)
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
