"""Serve the deployments from this process (Prefect's `serve`: no work pool or worker to set up):

    python -m flows.deploy          # with PREFECT_API_URL pointing at a running `prefect server start`

- `udddm-experiment/default`: manual trigger; parameters as in `flows.experiment.experiment`
  (`overrides`, `metric`, `registry`, `alias`, `stage_timeout_s`, `stage_retries`).
- `udddm-experiment/nightly`: the same flow on a cron schedule (UDDDM_NIGHTLY_CRON, default 02:00 UTC),
  with params.yaml as the workspace has it.
- `udddm-sweep/sweep`: a grid sweep (`grid`, `overrides`, `metric`, `concurrency`, ...).
- `udddm-sweep/study`: the method study (flows.sweep.STUDY_POINTS): uDDDM as published and its readings,
  beside iCT and EDM, in one comparison artifact and one parent MLflow run (docs/method-study.md).

Flow runs execute in subprocesses of this one, in this repository.
"""

from __future__ import annotations

import os
import sys

from prefect import serve
from prefect.deployments.runner import EntrypointType

from flows.experiment import REPO, experiment
from flows.sweep import STUDY_POINTS, sweep

NIGHTLY_CRON = os.environ.get("UDDDM_NIGHTLY_CRON", "0 2 * * *")


def deployments() -> list:
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["udddm"]}
    return [
        experiment.to_deployment("default", description="One pipeline experiment, triggered by hand: "
                                 "params overrides, DVC stages, scores, MLflow registry.", **common),
        experiment.to_deployment("nightly", cron=NIGHTLY_CRON, description="The pipeline with the workspace's "
                                 "params.yaml, every night.", **common),
        sweep.to_deployment("sweep", description="A grid of experiments with a comparison table; the best "
                            "model is registered.", **common),
        sweep.to_deployment("study", parameters={"points": STUDY_POINTS, "registry": False},
                            description="The method study: uDDDM as published and its readings beside iCT "
                            "and EDM, one comparison artifact (docs/method-study.md).", **common),
    ]


# what `prefect server start` needs for `prefect deployment run --watch` to print the flow runs' log lines
# (a failure's reason among them); without them it prints state changes only
LOG_STREAMING = {"stream_out_enabled": "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED",
                 "stream_publishing_enabled": "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"}


def log_streaming_problem() -> str | None:
    """What the Prefect server lacks to stream log lines to `--watch` (its settings, read from its API), or None."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    try:
        logs = httpx.get(PREFECT_API_URL.value().rstrip("/") + "/admin/settings", timeout=10).json()["server"]["logs"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    missing = [name for key, name in LOG_STREAMING.items() if not logs.get(key)]
    return (f"the Prefect server at {PREFECT_API_URL.value()} does not stream log lines: `prefect deployment run "
            f"--watch` will print state changes only, not why a run failed; start it with "
            f"{' '.join(f'{name}=true' for name in missing)}") if missing else None


def main() -> None:
    # flow runs are subprocesses that import `flows.*` by module path, from this repository
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if problem := log_streaming_problem():
        print(f"warning: {problem}", file=sys.stderr)
    serve(*deployments())


if __name__ == "__main__":
    main()
