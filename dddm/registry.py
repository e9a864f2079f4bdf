"""The MLflow Model Registry step: register a training run's `ema_model` under a name per dataset and
move an alias (`champion`) to it only when its score beats the current holder's.

Direction is explicit per metric: FID-like distances are better lower, IS / precision / recall higher.
A metric is `<method>/<row>/<name>`, e.g. `udddm/nfe1/fid_classifier`: the method whose model is registered,
then the name the score stage logs into that method's run (`<row>/<name>`, the row by network evaluations).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .tracking import TrackingUnavailable, check_reachable, complete_run, logged_model_id, run_page, ui_base

# one line per registration ("Waiting up to 300 seconds for model version to finish creation") in every log
logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)

LOWER_IS_BETTER = {"fid", "kid", "fid_classifier"}
REGISTER_LATER = "dvc repro -f register"  # the register stage logs what an outage kept from a run, then registers


class NotRegistered(RuntimeError):
    """A model that cannot be registered now: the tracking server does not answer, or the run lacks the model.
    The message names the run and the command that registers it later."""

    def __init__(self, run_id: str, reason: str):
        super().__init__(f"MLflow run {run_id} not registered: {reason}; once the server answers, `{REGISTER_LATER}` "
                         "registers it")
HIGHER_IS_BETTER = {"is", "is_classifier", "precision", "recall"}


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    if name in LOWER_IS_BETTER:
        return True
    if name in HIGHER_IS_BETTER:
        return False
    raise ValueError(f"metric {metric!r}: no known direction; use <method>/nfe<k>/<name> with <name> one of "
                     f"{sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER)}")


def is_better(new: float, old: float, metric: str) -> bool:
    """Strictly better: a tie keeps the current champion."""
    return new < old if lower_is_better(metric) else new > old


def split_metric(metric: str) -> tuple[str, str, str]:
    """'udddm/nfe1/fid_classifier' -> ('udddm', 'nfe1', 'fid_classifier')."""
    parts = metric.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"metric {metric!r}: expected <method>/<row>/<name>, e.g. edm/nfe35/fid_classifier")
    return parts[0], parts[1], parts[2]


def model_name(method: str, dataset: str) -> str:
    return f"{method}-{dataset}"


def resolve_uri(uri: str, repo: Path) -> str:
    """A relative SQLite URI (the default `sqlite:///mlflow.db`) is relative to the repository."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((repo / uri[len(prefix):]).resolve())
    return uri


def run_url(tracking_uri: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the UI's address is known."""
    base = ui_base(tracking_uri)
    if base is None:
        return None
    return run_page(base, MlflowClient(tracking_uri).get_run(run_id).info.experiment_id, run_id)


def run_link(tracking_uri: str, run_id: str) -> str:
    """A markdown link to the run in the MLflow UI, or how to open it."""
    url = run_url(tracking_uri, run_id)
    if url:
        return f"[{run_id}]({url})"
    return f"`{run_id}` in `{tracking_uri}` (`mlflow ui --backend-store-uri {tracking_uri}`, or set MLFLOW_UI_URL)"


def register_if_better(tracking_uri: str, run_id: str, name: str, metric: str, alias: str = "champion",
                       score: float | None = None, artifact: str = "ema_model") -> dict:
    """Register the run's logged model `artifact` as a version of `name` (once per run), tagged with its
    `metric` and `score`, and point `alias` at it when there is no holder yet or the score is strictly better
    than the holder's. `score` defaults to the run's metric in MLflow; pass the experiment's own number
    (out/score/metrics.json) when DVC restored the score stage from its run-cache without logging it again.
    The holder's score is its version's `score` tag when that was for the same metric, else its run's metric."""
    try:
        check_reachable(tracking_uri)  # within seconds: MLflow's own retries take minutes
    except TrackingUnavailable as e:
        raise NotRegistered(run_id, str(e)) from None
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    if score is None:
        if metric not in run.data.metrics:
            raise ValueError(f"MLflow run {run_id} has no metric {metric!r} (it has {sorted(run.data.metrics)}); "
                             "did the score stage run, and is that step count in sample.steps?")
        score = run.data.metrics[metric]
    model_id = logged_model_id(client, run, artifact)
    if model_id is None:
        raise NotRegistered(run_id, f"it has no logged model {artifact!r}")
    try:
        client.create_registered_model(name, description="uDDDM EMA networks; alias "
                                       f"{alias!r}: the best by the registering flow's metric")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    direction = "lower" if lower_is_better(metric) else "higher"
    version = existing[0] if existing else client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
        tags={"metric": metric, "score": str(score), "better": direction})

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    holder_score = None
    if holder is not None:
        holder_score = (float(holder.tags["score"]) if holder.tags.get("metric") == metric and "score" in holder.tags
                        else client.get_run(holder.run_id).data.metrics.get(metric))
    if holder is not None and str(holder.version) == str(version.version):
        moved = False  # already the champion
    else:
        moved = holder is None or (holder_score is not None and is_better(score, holder_score, metric))
    if moved:
        client.set_registered_model_alias(name, alias, version.version)
        for key, value in {"metric": metric, "score": str(score), "better": direction}.items():
            client.set_model_version_tag(name, str(version.version), key, value)  # what earned it the alias
    return {"name": name, "version": str(version.version), "metric": metric, "score": score, "better": direction,
            "alias": alias, "moved": moved, "previous_version": str(holder.version) if holder else None,
            "previous_score": holder_score, "run_link": run_link(tracking_uri, run_id)}


def register_trained(out: Path, repo: Path, name: str, metric: str, score: float, alias: str = "champion") -> dict:
    """register_if_better for the train stage whose outputs are in `out` (its mlflow_run.json; a relative SQLite
    URI is relative to `repo`), after logging into its run what a tracking outage kept from it (complete_run; the
    list of it under `completed`). NotRegistered when the server does not answer."""
    reference = json.loads((out / "mlflow_run.json").read_text())
    uri, run_id = resolve_uri(reference["tracking_uri"], repo), reference["run_id"]
    try:
        completed = complete_run(out, uri, run_id) if "incomplete" in reference else []
    except TrackingUnavailable as e:
        raise NotRegistered(run_id, str(e)) from None
    return register_if_better(uri, run_id, name, metric, alias, score=score) | {"run_id": run_id, "completed": completed}
