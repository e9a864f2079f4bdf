"""MLflow tracking: the one module that imports mlflow. Only rank 0 creates a tracker.

The tracking URI is MLFLOW_TRACKING_URI when set, else a SQLite database in the working
directory, so `mlflow ui` there shows the runs with no server set up.
"""

from __future__ import annotations

import collections
import csv
import getpass
import hashlib
import json
import logging
import os
import sqlite3
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.models import ModelSignature
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from .files import atomic_open
from .headline import fid_key
from .pixels import image_grid
from .sampling import sample
from .unet import UNet

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
# While training, one tracking request waits this long, once (MLflow's own default: 120 s, retried 7 times with
# backoff, which froze a run for 8 minutes when the server died); a failed call is tried again after RETRY_AFTER_S.
REQUEST_TIMEOUT_S = 5
RETRY_AFTER_S = 30
MAX_QUEUED_METRICS = 200_000  # about 40 MB; beyond it the oldest queued metrics are dropped

# The experiment tag MLflow 3's UI reads to open an experiment as model training (runs, metrics, models),
# not in its GenAI layout (traces, latency, token usage)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow prints "View run ... at" and "View experiment at" when a run ends, the experiment's link opening the
# GenAI layout; the train stage logs one link of its own instead (run_page)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; raised at stage start, not hours later."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_reachable(uri: str, timeout: float = 4.0) -> None:
    """Fail fast (within seconds, not after MLflow's two minutes of retries) with the URI named when an
    HTTP tracking server does not answer or a SQLite tracking database cannot be opened."""
    if uri.startswith("sqlite:///"):
        _check_sqlite(uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({e}); start it, or unset "
                                  f"MLFLOW_TRACKING_URI to log into {DEFAULT_URI}") from None


def _check_sqlite(uri: str) -> None:
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does
        with sqlite3.connect(path, timeout=2) as db:
            db.execute("pragma schema_version")
    except (OSError, sqlite3.Error) as e:
        raise TrackingUnavailable(f"MLflow tracking database {uri} cannot be opened ({path}: {e}); fix the "
                                  f"path, or unset MLFLOW_TRACKING_URI to log into {DEFAULT_URI}") from None


# Where MLflow's SQLite schema keeps absolute artifact locations.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def rebase_local_store(uri: str) -> None:
    """Point the default store's artifact locations at this checkout's mlruns/. MLflow records them as
    absolute paths when an experiment is created, so in a copied or moved repository (or a DVC experiment
    workspace made from a copy) runs and models would silently land in the original's mlruns/."""
    db = Path(uri.removeprefix("sqlite:///"))
    if uri != DEFAULT_URI or not db.is_file():
        return
    here = (Path.cwd() / "mlruns").as_posix()
    with sqlite3.connect(db, timeout=30) as con:
        tables = {name for (name,) in con.execute("select name from sqlite_master where type = 'table'")}
        default = con.execute("select artifact_location from experiments where experiment_id = 0").fetchone() \
            if "experiments" in tables else None
        if default is None or not default[0].endswith("/0"):
            return
        old = default[0].removeprefix("file://")[:-len("/0")]
        if old == here:
            return
        for table, column in LOCATION_COLUMNS:
            if table in tables:
                for prefix in (old, "file://" + old):
                    con.execute(f"update {table} set {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                                f"where substr({column}, 1, ?) = ?", (here, len(prefix) + 1, len(prefix), prefix))
    log.warning("%s was made in %s; its artifact locations now point into %s", db, old, here)


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 2e-4}} -> {"train.lr": "0.0002"}."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """The tags the MLflow UI shows as a run's Source, User and Git commit, and the machine and workspace (the
    repository the stage runs in) that logged it: runs of several clones and machines share one server."""
    script = Path(sys.argv[0] or "python").resolve()
    source = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script.name
    return {"mlflow.source.name": str(source), "mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser(),
            "mlflow.source.git.commit": git_commit(), "host": socket.gethostname(), "workspace": str(Path.cwd())}


def ui_base(uri: str) -> str | None:
    """The MLflow UI's address: the tracking server itself, or MLFLOW_UI_URL for a `mlflow ui` someone runs
    beside a local store (unset: no address is known)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("MLFLOW_UI_URL", "").rstrip("/") or None


def run_page(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI at `base`, in its model-training layout: MLflow 3's UI picks the layout from
    the `workflowType` query parameter, else from the browser's last choice (GenAI in a fresh profile), whatever
    the experiment's EXPERIMENT_KIND tag says."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def experiment_of_kind(client: MlflowClient, name: str) -> mlflow.entities.Experiment:
    """The experiment `name` with the EXPERIMENT_KIND tags, created with them if missing. Runs that start at once
    (a sweep's points on two workers) race for a new experiment: creating it with its tags leaves no second write
    to collide (the server refused one run's tag insert as a duplicate key: tests/test_tracking.py); an older
    experiment without the tags gets them, a concurrent run's tag accepted (a tag a user changed is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            client.create_experiment(name, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another run created it first
                raise
        exp = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():
        if key not in exp.tags:
            try:
                client.set_experiment_tag(exp.experiment_id, key, value)
            except mlflow.exceptions.MlflowException:
                if key not in client.get_experiment(exp.experiment_id).tags:
                    raise
    return exp


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Nested params, flattened to dotted keys (values cut at MLflow's 6000 characters)."""
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flatten(params).items()])


def logged_model_id(client: MlflowClient, run: mlflow.entities.Run, name: str = "ema_model") -> str | None:
    """The id of the model `name` that `run` logged, if it logged one."""
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    return next((m.model_id for m in models if m.name == name), None)


class _WithEstimate(torch.nn.Module):
    def __init__(self, net: UNet):
        super().__init__()
        self.net = net

    def forward(self, x0_est: torch.Tensor, x_t: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        return self.net(x0_est, x_t, noise_label)


class _WithoutEstimate(_WithEstimate):
    def forward(self, x_t: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        return self.net(None, x_t, noise_label)


def tensor_arguments(net: UNet) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The network with tensor arguments only (pt2 traces a fixed signature; iCT's and EDM's networks take
    no x0 estimate) and an example of each argument, batch 2 (a batch of 1 would be exported as fixed)."""
    def image() -> torch.Tensor:  # one tensor each: export would take two arguments aliasing one as one input
        return torch.zeros(2, net.channels, net.image_size, net.image_size)
    inputs = {"x_t": image(), "noise_label": torch.zeros(2)}
    if net.conditioning == "none":
        return _WithoutEstimate(net), inputs
    return _WithEstimate(net), {"x0_est": image()} | inputs


def network_signature(inputs: dict[str, torch.Tensor]) -> ModelSignature:
    """Float32 tensors with a free batch dimension; the output is shaped like x_t."""
    def spec(name: str | None, example: torch.Tensor) -> TensorSpec:
        return TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), name)
    return ModelSignature(inputs=Schema([spec(k, v) for k, v in inputs.items()]),
                          outputs=Schema([spec(None, inputs["x_t"])]))


class MlflowTracker:
    """Logs a training run: params, tags, batched per-step metrics, sample grids, the final model."""

    def __init__(self, experiment: str, params: dict, tags: dict[str, str], run_id: str | None = None,
                 flush_every: int = 50, grid_every_epochs: int = 0, grid_sampler=None, run_name: str | None = None):
        self.uri = tracking_uri()
        check_reachable(self.uri)
        rebase_local_store(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        if run_id is not None:
            try:
                experiment_id = self.client.get_run(run_id).info.experiment_id
            except mlflow.exceptions.MlflowException:
                raise TrackingUnavailable(
                    f"MLflow run {run_id}, which this training run logged into before it was interrupted, is not "
                    f"in the tracking store {self.uri} (was MLFLOW_TRACKING_URI changed?); set it back, or delete "
                    f"mlflow_run.json in the run's checkpoint directory to continue in a new MLflow run") from None
        if run_id is None:
            exp = experiment_of_kind(self.client, experiment)
            run = self.client.create_run(exp.experiment_id, run_name=run_name, tags=tags | source_tags())
            run_id, experiment_id = run.info.run_id, exp.experiment_id
            log_params(self.client, run_id, params)
        self.run_id = run_id
        if (base := ui_base(self.uri)) is not None:
            log.info("MLflow run: %s", run_page(base, experiment_id, run_id))
        self.flush_every = flush_every
        self.grid_every_epochs = grid_every_epochs
        self.grid_sampler = grid_sampler  # callable(ema_module) -> {steps: images in [-1, 1]}
        self._pending: list[Metric] = []
        # The server answered at start; from here on it may go away without stopping training (_call).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.retry_after_s = RETRY_AFTER_S
        self._away_since: float | None = None  # when the current outage began
        self._retry_at = 0.0
        self.not_logged: list[str] = []  # what an outage cost the run, beyond queued metrics
        self.dropped_metrics = 0
        self._step = 0  # the last training step logged: the step the next grids are logged at

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        """One tracking call that must not stop or stall training: True when it went through. While the
        server is away, calls are skipped until `retry_after_s` has passed since the last try; the
        outage is one warning when it begins and one when it ends."""
        now = time.monotonic()
        if self._away_since is not None and now < self._retry_at:
            return False
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the tracking client raises, training goes on
            if self._away_since is None:
                self._away_since = now
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.warning("MLflow tracking at %s failed logging the %s (%s); training goes on: metrics are "
                            "queued and sent when it answers (tried again every %d s), images are skipped meanwhile",
                            self.uri, what, first, self.retry_after_s)
            self._retry_at = now + self.retry_after_s
            return False
        if self._away_since is not None:
            log.warning("MLflow tracking at %s answers again after %.0f s; the queued metrics are sent", self.uri,
                        now - self._away_since)
            self._away_since = None
        return True

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._step = step
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._pending) >= self.flush_every * max(1, len(metrics)):
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch = self._pending[:1000]  # MLflow's batch limit
            if not self._call("metrics", self.client.log_batch, self.run_id, metrics=batch):
                break
            del self._pending[:len(batch)]
        excess = len(self._pending) - MAX_QUEUED_METRICS
        if excess > 0:
            if not self.dropped_metrics:
                log.warning("MLflow tracking at %s: more than %d metrics queued; dropping the oldest", self.uri,
                            MAX_QUEUED_METRICS)
            self.dropped_metrics += excess
            del self._pending[:excess]

    def on_epoch_end(self, epoch: int, ema_module: torch.nn.Module) -> None:
        if self.grid_every_epochs and self.grid_sampler and (epoch + 1) % self.grid_every_epochs == 0:
            for steps, images in self.grid_sampler(ema_module).items():
                # at the training step the metrics have (the epoch's last): the charts' step slider, shared with
                # the loss curves, lands on steps that have a grid, the last one included
                if not self._call("image", self.client.log_image, self.run_id, image_grid(images),
                                  key=f"ema_{steps}step", step=self._step):
                    self.not_logged.append("sample grid")

    def incomplete(self) -> str | None:
        """What the run lacks because the server was away (None when nothing): for mlflow_run.json."""
        lost = [f"{len(self._pending)} queued metrics"] if self._pending else []
        lost += [f"{self.dropped_metrics} dropped metrics"] if self.dropped_metrics else []
        lost += [what if n == 1 else f"{n} x {what}" for what, n in collections.Counter(self.not_logged).items()]
        return f"not logged to {self.uri} (unreachable): " + ", ".join(lost) if lost else None

    def log_dataset(self, path: Path, name: str, fingerprint: str) -> None:
        """The prepared dataset as the run's training input (its path and fingerprint)."""
        dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name,
                              digest=fingerprint[:16])
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
        if not self._call("dataset", self.client.log_inputs, self.run_id, datasets=[entity]):
            self.not_logged.append("the dataset input")

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            if not self._call("tag", self.client.set_tag, self.run_id, key, value):
                self.not_logged.append(f"the tag {key}")

    def log_model(self, net: UNet, name: str = "ema_model") -> None:
        """The network as an MLflow PyTorch model in the pt2 format (torch.export: no pickle, no code
        needed to load it), with a signature naming its input tensors and a dynamic batch."""
        self.flush()
        self._retry_at = 0.0  # the end of the run: one more try
        if not self._call("model", log_network, self.run_id, net, name):
            self.not_logged.append(f"the model {name}")

    def finish(self, status: str = "FINISHED") -> None:
        self._retry_at = 0.0
        self.flush()
        if not self._call("status", self.client.set_terminated, self.run_id, status):
            self.not_logged.append(f"the run status {status}")
        if (lost := self.incomplete()) is not None:
            log.warning("MLflow run %s is incomplete: %s", self.run_id, lost)


def log_network(run_id: str, net: UNet, name: str = "ema_model") -> None:
    """`net` into the run as an MLflow PyTorch model in the pt2 format (torch.export: no pickle, no code needed to
    load it), with a signature naming its input tensors and a dynamic batch (the tracking URI: MLflow's current)."""
    module, inputs = tensor_arguments(net.cpu().eval())
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(module, name=name, serialization_format="pt2", signature=network_signature(inputs),
                                 input_example=tuple(inputs.values()),
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def complete_run(out: Path, uri: str, run_id: str, name: str = "ema_model") -> list[str]:
    """Log into a finished training run what a tracking outage kept from it (mlflow_run.json's `incomplete`), from
    the train stage's outputs in `out`: each metric's steps after the last one MLflow holds (loss.tsv, and the
    learning curve's points, curve.tsv), the model (model.pt) and the run's status; its sample grids stay lost.
    Returns what was logged ([] when nothing was missing); TrackingUnavailable when the server does not answer."""
    from .checkpoint import load_model
    from .training import curve_metrics

    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
        rows = _table(out / "loss.tsv")
        # a curve point is logged at the last step of its epoch (epoch 0: a fine-tuned run's initialisation)
        last_step = {int(r["epoch"]) + 1: int(r["step"]) for r in rows} | {0: 0}
        points = [(last_step[int(p["epoch"])], curve_metrics(p)) for p in _table(out / "curve.tsv")]
        steps = [(int(r["step"]), {k: v for k, v in r.items() if k != "step"}) for r in rows] + points
        now, metrics = int(time.time() * 1000), []
        for key in {k for _, values in steps for k in values}:
            logged = max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            metrics += [Metric(key, float(values[key]), now, step) for step, values in steps
                        if key in values and step > logged]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        done = [f"{len(metrics)} metrics"] if metrics else []
        if logged_model_id(client, run, name) is None:
            mlflow.set_tracking_uri(uri)
            log_network(run_id, load_model(out / "model.pt").net, name)
            done.append(f"the model {name}")
        if run.info.status == "RUNNING":  # the train stage's own set_terminated did not get through
            client.set_terminated(run_id, "FINISHED")
            done.append("its status")
    except mlflow.exceptions.MlflowException as e:
        raise TrackingUnavailable(f"MLflow tracking at {uri} failed completing run {run_id}: "
                                  f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
    return done


def ema_grid_sampler(method, shape: tuple[int, ...], device, num: int = 64):
    """A grid sampler for MlflowTracker: `num` EMA samples per step count of the method's sampler,
    with fixed noise, so grids are comparable across epochs."""
    def draw(module: torch.nn.Module) -> dict[int, torch.Tensor]:
        return {steps: sample(method, module, num, shape, steps, batch_size=num, device=device)
                for steps in method.sampler.steps}
    return draw


def write_run_reference(path: Path, run_id: str, incomplete: str | None = None) -> None:
    """The file later stages read to log into the same MLflow run; `incomplete` says what the run lacks."""
    reference = {"run_id": run_id, "tracking_uri": tracking_uri()} | ({"incomplete": incomplete} if incomplete else {})
    with atomic_open(path, "w") as f:
        f.write(json.dumps(reference, indent=2))


class EvaluationRun:
    """One scoring of a trained model: a child of its training run (nested under it in the UI) holding the
    sampling and scoring params it used, the sample grids and the scores, logged against the run's logged
    model. Each sampler/scoring configuration gets its own child, so a resample never rewrites the
    training run's numbers under params that say otherwise."""

    def __init__(self, reference: Path, params: dict, model: str = "ema_model"):
        if not reference.is_file():
            raise FileNotFoundError(f"{reference}: no MLflow run reference (run the train stage first)")
        data = json.loads(reference.read_text())
        check_reachable(data["tracking_uri"])
        rebase_local_store(data["tracking_uri"])
        self.client = MlflowClient(data["tracking_uri"])
        training = self.client.get_run(data["run_id"])
        self.training_run_id = training.info.run_id
        self.model_id = logged_model_id(self.client, training, model)
        digest = hashlib.sha256(json.dumps(flatten(params), sort_keys=True).encode()).hexdigest()[:8]
        self.run_id = self.client.create_run(
            training.info.experiment_id, run_name=f"{training.info.run_name}-eval-{digest}",
            tags=source_tags() | {"mlflow.parentRunId": training.info.run_id, "evaluation": digest,
                                  "method": training.data.tags.get("method", "")}).info.run_id
        log_params(self.client, self.run_id, params)

    def log_image_file(self, png_path: Path, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(png_path), artifact_path)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0, model_id=self.model_id)
                                                    for k, v in metrics.items()])

    def log_headline(self, metrics: dict) -> None:
        """The headline score of the score stage's `metrics` (the fewest-step FID) on the training run too, as
        the metric `fid_classifier` (or `fid`), so the runs list shows it in one column for every method; the
        tags `headline` and `headline_evaluation` name its row and the evaluation run holding all the scores.
        Always at step 0: MLflow shows the value of the highest step, which would keep an older sampler's."""
        key = fid_key(metrics)
        row, name = key.split("/")
        self.client.log_metric(self.training_run_id, name, float(metrics[row][name]), step=0)
        self.client.set_tag(self.training_run_id, "headline", key)
        self.client.set_tag(self.training_run_id, "headline_evaluation", self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def tag_run(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tags on a finished run (the flows link each training run to its DVC experiment and Prefect flow run)."""
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
