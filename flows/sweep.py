"""A grid sweep over params as a Prefect flow, ending with a comparison table and the best model
registered (its alias moved only when it beats the current champion).

concurrency = 1: one experiment after another in the repository's workspace, each a child flow run of
`flows.experiment` (per-stage tasks, rollback on failure, `dvc exp save`).
concurrency > 1: every grid point as a DVC temporary experiment (`dvc exp run --temp`, each in its own
copy of the workspace under .dvc/tmp/exps), `concurrency` of them at a time on Prefect's thread pool; the
workspace is left as it is and the results are read back from the experiments' git refs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import dvc.api  # the DVC package (flows.dvcrun is ours)
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flows import dvcrun
from flows.experiment import (DEFAULT_METRIC, REPO, experiment, experiment_name, failed, override_problem,
                              register_model, scores_table)
from dddm.registry import is_better, lower_is_better, model_name, resolve_uri, split_metric

DEFAULT_GRID = {"method.udddm.process": ["vp", "ve"], "method.udddm.metric": ["pseudo_huber", "l2"]}
# The method study (docs/method-study.md): uDDDM as published and the readings that test it, with iCT,
# EDM and ECT trained once beside them (their stages are restored from DVC's run-cache for every other
# point), uDDDM fine-tuned from EDM's model as ECT is, and 4x the training budget.
STUDY_POINTS = [{},  # the paper: VE, sigma_max 50, the prediction into the store, n counting epochs
                {"method.udddm.process": "vp"},  # the paper's VP, T = 8000
                {"method.udddm.processes.ve.sigma_max": 2.0},
                {"method.udddm.estimates_from": "data"},  # the authors' released code
                {"method.udddm.n_counts": "step"},  # Algorithm 1's literal n <- n + 1
                # uDDDM given ECT's head start: fine-tuned from EDM's model (its budget and lr), both readings
                {"methods": ["ict", "edm"], "finetune.methods": ["ect", "udddm"]},
                {"methods": ["ict", "edm"], "finetune.methods": ["ect", "udddm"], "method.udddm.estimates_from": "data"},
                # budget: 4x the default's training images (240 epochs), with their learning curves
                {"methods": ["udddm"], "finetune.methods": [], "train.epochs": 240},
                {"methods": ["udddm"], "finetune.methods": [], "train.epochs": 240, "method.udddm.estimates_from": "data"},
                {"methods": ["ict"], "finetune.methods": [], "train.epochs": 240}]


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """{"a": [1, 2], "b": ["x"]} -> [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}] (the last key varies fastest,
    so neighbours share upstream stages and DVC reruns only what changed)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def points_grid(points: list[dict[str, Any]]) -> dict[str, list]:
    """The columns of explicit points: every key any point sets, with each point's value (None where a
    point leaves that key as params.yaml has it)."""
    keys = list(dict.fromkeys(key for point in points for key in point))
    return {key: [point.get(key) for point in points] for key in keys}


@task(name="temp-experiment", task_run_name="{name}", retries=1, retry_delay_seconds=30,
      retry_condition_fn=dvcrun.retry_if_transient)
def temp_experiment(repo: str, name: str, overrides: dict[str, Any], timeout_s: float) -> dict:
    """`dvc exp run --temp -S ...`: the whole pipeline in a temporary copy of the workspace."""
    root = Path(repo)
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or resolve_uri("sqlite:///mlflow.db", root)  # not the copy's
    args = ["exp", "run", "--temp", "--name", name, *(a for s in dvcrun.set_params(overrides) for a in ("-S", s))]
    dvcrun.run(args, root, get_run_logger(), timeout_s, extra_env={"MLFLOW_TRACKING_URI": tracking},
               what=f"experiment {name}")
    return read_experiment(root, name, overrides, tracking)


@task(name="pool-experiment", task_run_name="{deployment}: {overrides}")
def pool_experiment(repo: str, deployment: str, overrides: dict[str, Any], metric: str, timeout_s: float) -> dict:
    """One point as a flow run of the work-pool deployment `deployment` (prefect.yaml): whichever worker is
    free runs it in its own clone and pushes its DVC experiment to git's `origin` and the DVC remote;
    the experiment is pulled back here to be compared."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"overrides": overrides, "metric": metric, "registry": False,
                                                 "stage_timeout_s": timeout_s})
    if not run.state.is_completed():
        raise RuntimeError(f"{deployment} run {run.name}: {run.state.type.value}: {run.state.message}")
    name = f"{run.name}-{str(run.id)[:8]}"  # flows.experiment.experiment_name() of that run
    dvcrun.run(["exp", "pull", "origin", name], Path(repo), get_run_logger(), what=f"dvc exp pull origin {name}")
    return read_experiment(Path(repo), name, overrides, os.environ.get("MLFLOW_TRACKING_URI", ""))


def read_experiment(root: Path, name: str, overrides: dict[str, Any], tracking: str) -> dict:
    """A finished DVC experiment's params, scores and MLflow run references, read from its commit."""
    def read(path: str):  # from the experiment's commit
        return yaml.safe_load(dvc.api.read(path, repo=str(root), rev=name))

    params = read("params.yaml")
    paths = {m: dvcrun.method_outputs(root, m) for m in dvcrun.compared_methods(params)}
    metrics = {m: read(str(p["metrics"].relative_to(root))) for m, p in paths.items()}
    references = {}
    for m, p in paths.items():
        try:
            references[m] = read(str(p["run"].relative_to(root)))
        except Exception:  # not committed to the experiment (e.g. git-ignored): no registry for this one
            get_run_logger().warning("experiment %s: %s is not in its commit", name, p["run"])
            references[m] = {"run_id": None, "tracking_uri": tracking}
    return {"experiment": name, "overrides": overrides, "metrics": metrics, "dataset": params["data"]["source"],
            "runs": {m: {"run_id": r["run_id"], "tracking_uri": resolve_uri(r["tracking_uri"], root)}
                     for m, r in references.items()}}


def comparison_table(grid: dict[str, list], rows: list[tuple[dict, dict | None]], metric: str,
                     best: dict | None) -> str:
    method, row, _ = split_metric(metric)
    head = ["", *grid, metric, "precision", "recall", "DVC experiment"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for point, result in rows:
        cells = [json.dumps(point.get(k)) for k in grid]
        if result is None:
            lines.append("| failed | " + " | ".join(cells) + " | | | | (see its log) |")
            continue
        m = result["metrics"].get(method, {}).get(row, {})
        numbers = [score_of(result, metric), m.get("precision"), m.get("recall")]
        lines.append(f"| {'**best**' if result is best else ''} | " + " | ".join(cells) + " | "
                     + " | ".join("" if v is None else f"{v:.4g}" for v in numbers)
                     + f" | {result.get('experiment') or ''} |")
    return "\n".join(lines)


def group_runs(results: list[dict], name: str) -> str | None:
    """One parent MLflow run per sweep, with every point's training runs as its children (the UI nests them)."""
    from mlflow.tracking import MlflowClient

    children = [run for r in results for run in r.get("runs", {}).values() if run.get("run_id")]
    if not children:
        return None
    client = MlflowClient(children[0]["tracking_uri"])
    experiment_id = client.get_run(children[0]["run_id"]).info.experiment_id
    parent = client.create_run(experiment_id, run_name=name, tags={"sweep": name}).info.run_id
    for run in children:
        MlflowClient(run["tracking_uri"]).set_tag(run["run_id"], "mlflow.parentRunId", parent)
    client.set_terminated(parent)
    return parent


def score_of(result: dict, metric: str) -> float | None:
    method, row, name = split_metric(metric)
    value = result["metrics"].get(method, {}).get(row, {}).get(name)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


@flow(name="udddm-sweep")
def sweep(grid: dict[str, list] = DEFAULT_GRID, overrides: dict[str, Any] | None = None, metric: str = DEFAULT_METRIC,
          registry: bool = True, alias: str = "champion", concurrency: int = 1, stage_timeout_s: float = 24 * 3600,
          repo: str | None = None, points: list[dict[str, Any]] | None = None,
          deployment: str | None = None) -> list[dict] | State:
    """Every combination of `grid` ({"method.udddm.process": ["vp", "ve"], ...}), or the explicit `points`
    when given, on top of `overrides`, `concurrency` at a time; the best by `metric`
    (`<method>/nfe<k>/<name>`) is registered; the points' MLflow runs are grouped under one parent run.
    With `deployment` (a work-pool deployment, `udddm-experiment/pool`), each point is a flow run of it,
    `concurrency` at a time, on whichever of the pool's workers are free."""
    logger = get_run_logger()
    root = Path(repo).resolve() if repo else REPO
    lower_is_better(metric)
    if concurrency < 1:
        raise ValueError(f"concurrency: {concurrency} must be >= 1")
    if points is not None:
        grid = points_grid(points)
    else:
        points = grid_points(grid)
    for point in points:  # every point's overrides checked before any runs: the key-naming message, not DVC's
        problem = override_problem(root, {**(overrides or {}), **point})
        if problem:
            return failed(f"point {json.dumps(point)}: {problem}")
    logger.info("%d grid points, %d at a time", len(points), concurrency)
    rows: list[tuple[dict, dict | None]] = []
    if deployment:
        with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
            futures = [runner.submit(pool_experiment, {"repo": str(root), "deployment": deployment,
                                                        "overrides": {**(overrides or {}), **point}, "metric": metric,
                                                        "timeout_s": stage_timeout_s})
                       for point in points]
            wait(futures)
        for point, future in zip(points, futures):
            rows.append((point, future.result() if future.state.is_completed() else None))
    elif concurrency == 1:
        for point in points:
            state = experiment(overrides={**(overrides or {}), **point}, metric=metric, registry=False,
                               stage_timeout_s=stage_timeout_s, repo=str(root), return_state=True)
            rows.append((point, state.result() if state.is_completed() else None))
    else:
        prefix = experiment_name()
        with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
            futures = [runner.submit(temp_experiment, {"repo": str(root), "name": f"{prefix}-{i}",
                                                        # the best point is registered below, not every point
                                                        "overrides": {"tracking.register_models": False,
                                                                      **(overrides or {}), **point},
                                                        "timeout_s": stage_timeout_s})
                       for i, point in enumerate(points)]
            wait(futures)
        for point, future in zip(points, futures):
            rows.append((point, future.result() if future.state.is_completed() else None))

    scored = [r for _, r in rows if r is not None and score_of(r, metric) is not None]
    best = None
    for result in scored:
        if best is None or is_better(score_of(result, metric), score_of(best, metric), metric):
            best = result
    text = [f"## uDDDM sweep: {len(points)} points, by `{metric}` ({'lower' if lower_is_better(metric) else 'higher'} "
            "is better)", "", comparison_table(grid, rows, metric, best), ""]
    method = split_metric(metric)[0]
    if best and registry and best["runs"].get(method, {}).get("run_id"):
        run = best["runs"][method]
        registered = register_model(run["tracking_uri"], run["run_id"], model_name(method, best["dataset"]), metric,
                                    alias, best["metrics"])
        best["registry"] = registered
        if registered:  # None: a tracking outage, said in the task's log
            outcome = "moved to it" if registered["moved"] else f"stays on version {registered['previous_version']}"
            text.append(f"Best: {registered['run_link']}, registered as `{registered['name']}` version "
                        f"{registered['version']}; alias `{alias}` {outcome}.")
    parent = group_runs([r for _, r in rows if r is not None], f"sweep {experiment_name()}")
    if parent:
        text.append(f"MLflow: the points' runs are children of run `{parent}`.")
    for point, result in rows:
        if result is not None:
            text += ["", f"### {json.dumps(point) if point else 'params.yaml as it is'}", "",
                     scores_table(result["metrics"])]
    create_markdown_artifact("\n".join(text), key="udddm-sweep", description="comparison of a sweep")
    lost = [point for point, r in rows if r is None]
    if lost:
        return failed(f"{len(lost)} of {len(points)} grid points failed: {json.dumps(lost)}")
    return [r for _, r in rows]
