"""MLflow tracking against a real tracking server on loopback, through the real stage commands."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import NO_MLFLOW_MODEL, free_port, run_env, stage_command, start_mlflow_server, tiny_params, write_params
from dddm.checkpoint import load_model
from dddm.pixels import image_grid, to_uint8
from dddm.compute import threads_per_process
from dddm.tracking import EXPERIMENT_KIND, experiment_of_kind, flatten

pytestmark = pytest.mark.slow


def kill_server(proc: subprocess.Popen) -> None:
    """kill -9 of the server's process group (mlflow server runs its workers as children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """(the server's store directory, its URI): a tracking server on loopback for the module's tests."""
    root = tmp_path_factory.mktemp("mlflow")
    proc, uri = start_mlflow_server(root, free_port())
    yield root, uri
    os.killpg(proc.pid, signal.SIGTERM)  # its job runner and consumers too (they outlive the server's own exit)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_store):
    return mlflow_store[1]


def stage(repo, name, uri):
    return subprocess.run(stage_command(repo, name), cwd=repo, env=run_env(MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=600)


def test_a_run_logs_params_tags_metrics_grids_and_model(tiny_copy, mlflow_server):
    params = tiny_params(train={"epochs": 2, "nproc": 2}, tracking={"experiment": "test-exp", "grid_every_epochs": 1})
    write_params(tiny_copy, params)
    said = {}
    for name in ("train@udddm", "sample@udddm", "score@udddm"):  # after the data stages (tiny_copy)
        result = stage(tiny_copy, name, mlflow_server)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Pickle" not in result.stderr, name  # MLflow's warning for pickled models
        said[name] = result.stdout + result.stderr

    ref = json.loads((tiny_copy / "out/train/udddm/mlflow_run.json").read_text())
    assert ref["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(ref["run_id"])
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "test-exp"  # opened as model training in the UI, not in the GenAI layout:
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # params.yaml with this method's section, as validated (max_hours a float); `finetune` only for a fine-tuned method
    logged = {k: v for k, v in params.items() if k not in ("methods", "method", "finetune")} | \
        {"method": {"udddm": params["method"]["udddm"]}}
    logged["limits"]["max_hours"] = float(logged["limits"]["max_hours"])
    logged["train"]["threads"] = threads_per_process("auto")  # the number the stage used (it inherits this env)
    assert run.data.params == flatten(json.loads(json.dumps(logged)))
    assert run.data.tags["method"] == "udddm"
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["device"] == "cpu" and tags["store_backend"] == "DeviceStore"
    assert len(tags["mlflow.source.git.commit"]) > 0
    assert tags["mlflow.source.name"] == "pipeline/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]
    assert tags["workspace"] == str(tiny_copy) and tags["host"]  # two clones on one host told apart
    # one link, in MLflow's model-training layout; not MLflow's own "View run" / "View experiment" lines
    page = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert f"MLflow run: {page}" in said["train@udddm"] and "View experiment" not in said["train@udddm"]
    method, process, source, digest = run.info.run_name.split("-")  # readable: method, process, data, config
    assert (method, process, source) == ("udddm", "vp", "digits") and len(digest) == 8
    [dataset] = run.inputs.dataset_inputs
    prepared = json.loads((tiny_copy / "data/prepared.json").read_text())
    assert dataset.dataset.name == "digits" and prepared["fingerprint"].startswith(dataset.dataset.digest)
    assert json.loads(dataset.dataset.source)["uri"] == str(tiny_copy / "data/prepared.arrow")
    steps = len((tiny_copy / "out/train/udddm/loss.tsv").read_text().splitlines()) - 1
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    for key in ("guide", "iterative", "weight", "lr", "img_per_s", "store_bytes"):
        assert client.get_metric_history(run.info.run_id, key), key
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for key in ("ema_1step", "ema_2step"):  # each grid keyed, at the training step of its epoch's end (the slider)
        assert {int(p.split("+")[2]) for p in grids if p.startswith(f"images/{key}+step+") and p.endswith(".png")} \
            == {steps // 2, steps}
    models = client.search_logged_models([run.info.experiment_id])
    [model] = [m for m in models if m.source_run_id == run.info.run_id and m.name == "ema_model"]
    # pt2 (torch.export): loads without dddm or unpickling, and computes what the EMA network computes
    local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, tracking_uri=mlflow_server)
    signature = mlflow.models.Model.load(local).signature.inputs.to_dict()
    assert [(i["name"], list(i["tensor-spec"]["shape"])) for i in signature] == \
        [(n, [-1, 1, 8, 8]) for n in ("x0_est", "x_t")] + [("noise_label", [-1])]
    exported = mlflow.pytorch.load_model(local)
    ema = load_model(tiny_copy / "out/train/udddm/model.pt").net
    generator = torch.Generator().manual_seed(0)
    x0_est, x_t = (torch.randn(3, 1, 8, 8, generator=generator) for _ in range(2))
    noise_label = torch.rand(3, generator=generator)
    expected = ema(x0_est, x_t, noise_label)
    assert expected.abs().max() > 0 and torch.allclose(exported(x0_est, x_t, noise_label), expected, atol=1e-5)
    assert "nfe1/fid_classifier" not in run.data.metrics  # scores go to the evaluation's own run:
    [evaluation] = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    # but the headline, the fewest-step FID, is on the training run too (a column of the runs list)
    scores = json.loads((tiny_copy / "out/score/udddm/metrics.json").read_text())
    assert run.data.metrics["fid_classifier"] == pytest.approx(scores["nfe1"]["fid_classifier"])
    assert run.data.tags["headline"] == "nfe1/fid_classifier"
    assert run.data.tags["headline_evaluation"] == evaluation.info.run_id
    assert evaluation.info.run_name.startswith(run.info.run_name + "-eval-")
    assert evaluation.data.params["sampler.udddm.steps"] == "[1, 2]" and "train.lr" not in evaluation.data.params
    samples = {a.path for a in client.list_artifacts(evaluation.info.run_id, "samples")}
    assert samples == {"samples/1-step.png", "samples/2-step.png"}
    scores = json.loads((tiny_copy / "out/score/udddm/metrics.json").read_text())
    assert evaluation.data.metrics["nfe1/fid_classifier"] == pytest.approx(scores["nfe1"]["fid_classifier"])
    linked = {m.key: (m.value, m.run_id) for m in client.get_logged_model(model.model_id).metrics}  # on the model's page
    assert linked["nfe1/fid_classifier"] == (pytest.approx(scores["nfe1"]["fid_classifier"]), evaluation.info.run_id)


@pytest.mark.parametrize("experiment", ["new", "untagged"])
def test_runs_starting_together_share_the_experiment_and_neither_fails_on_its_tag(mlflow_store, experiment):
    """Two runs starting at once (a sweep's points on two workers; a CI run failed so): both read the experiment,
    then both write, one after the other, as the test holds the store's write lock while they line up. Before
    experiment_of_kind the second run's tag was refused ("UNIQUE constraint failed") and its train stage failed."""
    import sqlite3
    import threading

    root, uri = mlflow_store
    name = f"together-{experiment}"
    if experiment == "untagged":  # made before this project tagged experiments, or by another program
        MlflowClient(uri).create_experiment(name)
    store = sqlite3.connect(root / "mlflow.db", isolation_level=None)
    found, errors = [], []

    def start_run():
        try:
            found.append(experiment_of_kind(MlflowClient(uri), name).experiment_id)
        except Exception as e:  # noqa: BLE001 (the test reports it)
            errors.append(e)

    store.execute("BEGIN IMMEDIATE")
    runs = [threading.Thread(target=start_run) for _ in range(2)]
    for run in runs:
        run.start()
    time.sleep(3)  # both reach their write (within SQLite's 5 s busy timeout)
    store.execute("COMMIT")
    store.close()
    for run in runs:
        run.join(60)
    assert not errors, errors
    tagged = MlflowClient(uri).get_experiment_by_name(name)
    assert found == [tagged.experiment_id] * 2 and EXPERIMENT_KIND.items() <= tagged.tags.items()


def test_an_experiment_kind_a_user_chose_is_kept(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert experiment_of_kind(client, "chosen").tags["mlflow.experimentKind"] == "genai_development"
    assert client.get_experiment_by_name("chosen").tags["mlflow.experimentKind"] == "genai_development"
    assert experiment_of_kind(client, "new").tags == EXPERIMENT_KIND


def test_a_tracking_server_down_at_the_score_stage_is_one_warning_and_the_stage_succeeds(tiny_copy, tmp_path):
    """The issue's trial: the server stopped after training; the score stage wrote metrics.json, then its
    TrackingUnavailable failed the stage (and `dvc repro`, and the flow)."""
    write_params(tiny_copy, tiny_params(methods=["udddm"], finetune={"methods": []}, train={"eval_every": 0},
                                        score={"untrained_baseline": False},
                                        tracking={"grid_every_epochs": 0, **NO_MLFLOW_MODEL}))
    server, uri = start_mlflow_server(tmp_path, free_port())
    try:
        for name in ("train@udddm", "sample@udddm"):
            result = stage(tiny_copy, name, uri)
            assert result.returncode == 0, result.stderr[-3000:]
        run_id = json.loads((tiny_copy / "out/train/udddm/mlflow_run.json").read_text())["run_id"]
        run = MlflowClient(uri).get_run(run_id)
        assert run.info.status == "FINISHED"  # tracking.log_model: false: a run without a model
        assert not MlflowClient(uri).search_logged_models([run.info.experiment_id])
    finally:
        kill_server(server)
    result = stage(tiny_copy, "score@udddm", uri)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"score: WARNING: udddm: scores not logged to MLflow: "
                                                         f"MLflow tracking server {uri} is unreachable"), result.stderr
    assert "Traceback" not in result.stderr and "score: udddm," in result.stdout  # the summary table
    assert json.loads((tiny_copy / "out/score/udddm/metrics.json").read_text())["nfe1"]["fid_classifier"] > 0


def test_unreachable_server_fails_at_start_naming_the_uri(tiny_copy):
    write_params(tiny_copy, tiny_params())
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    result = stage(tiny_copy, "train@udddm", uri)
    assert result.returncode != 0
    assert uri in result.stderr and "unreachable" in result.stderr
    assert time.time() - started < 60
    assert not (tiny_copy / "out/train/udddm/model.pt").exists()


def test_a_bad_or_changed_tracking_uri_fails_at_start_naming_it(tiny_copy, tmp_path):
    """A SQLite URI that cannot be opened is named at once (MLflow itself retries for two minutes);
    a resume whose MLflow run is not in the current tracking store says so instead of a traceback."""
    write_params(tiny_copy, tiny_params(train={"eval_every": 0}, tracking=NO_MLFLOW_MODEL))
    bad = "sqlite:////proc/x.db"
    result = stage(tiny_copy, "train@udddm", bad)
    assert result.returncode != 0
    # the worker's own line (torchrun's agent prints its failure summary after it)
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith(f"train: MLflow tracking database {bad} cannot be opened") for line in lines), lines[-20:]

    first = stage(tiny_copy, "train@udddm", f"sqlite:///{tmp_path}/a.db")
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.loads((tiny_copy / "out/train/udddm/mlflow_run.json").read_text())["run_id"]
    other = f"sqlite:///{tmp_path}/b.db"
    result = stage(tiny_copy, "train@udddm", other)  # resumes from the final checkpoint
    assert result.returncode != 0
    said = [line for line in result.stderr.strip().splitlines()
            if line.startswith(f"train: MLflow run {run_id}, which this training run logged into")]
    assert said and other in said[0], result.stderr[-3000:]


LOG_A_RUN = """
import json, sys, torch
from dddm.pixels import image_grid
from dddm.tracking import MlflowTracker
tracker = MlflowTracker("copies", {"a": 1}, tags={})
tracker.client.log_image(tracker.run_id, image_grid(torch.zeros(4, 1, 8, 8)), "grid.png")
tracker.finish()
print(json.dumps({"run": tracker.run_id, "artifacts": tracker.client.get_run(tracker.run_id).info.artifact_uri}))
"""


def test_a_copied_repository_logs_into_its_own_mlruns(tmp_path):
    env = {k: v for k, v in run_env().items() if k != "MLFLOW_TRACKING_URI"}  # the default: ./mlflow.db

    def log_a_run(cwd):
        out = subprocess.run([sys.executable, "-c", LOG_A_RUN], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1]), out.stderr

    original = tmp_path / "original"
    original.mkdir()
    first, _ = log_a_run(original)
    assert first["artifacts"].startswith(str(original / "mlruns"))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    second, stderr = log_a_run(copy)
    assert second["artifacts"].startswith(str(copy / "mlruns")) and "artifact locations now point into" in stderr
    assert len(list((original / "mlruns").rglob("grid.png"))) == 1
    assert len(list((copy / "mlruns").rglob("grid.png"))) == 2  # the copied run's and the new one's
    # the copied run's own record follows the copy too
    db = MlflowClient(f"sqlite:///{copy}/mlflow.db")
    assert db.get_run(first["run"]).info.artifact_uri.startswith(str(copy / "mlruns"))


def test_image_grid_enlarges_small_images_and_tiles_them_as_torchvision_does():
    from torchvision.utils import make_grid

    grid = image_grid(torch.zeros(10, 1, 8, 8))
    assert grid.dtype.name == "uint8" and grid.shape[0] > 32 and grid.shape[2] == 3  # RGB
    generator = torch.Generator().manual_seed(0)
    for n, channels, side in ((64, 1, 8), (10, 1, 8), (100, 1, 16), (7, 3, 32), (2, 3, 28)):
        images = torch.rand(n, channels, side, side, generator=generator) * 2 - 1
        scale = max(1, -(-32 // side))  # enlarged to at least 32 pixels, as image_grid does
        tiles = to_uint8(images[:64]).repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        expected = make_grid(tiles, nrow=8, padding=2, pad_value=255).permute(1, 2, 0).numpy()
        assert (image_grid(images) == expected).all(), (n, channels, side)


def test_a_tracking_server_killed_mid_run_does_not_stop_training(tiny_copy, tmp_path):
    """The issue's trial: the server killed with kill -9 while the train stage runs (and not restarted).
    Training finishes with its outputs; one warning when the tracking fails, one naming what the run
    lacks; mlflow_run.json says so."""
    write_params(tiny_copy, tiny_params(train={"epochs": 8, "batch_size": 64, "eval_every": 0},
                                        tracking={"experiment": "dies", "grid_every_epochs": 1}))
    server, uri = start_mlflow_server(tmp_path, free_port())
    try:
        train = subprocess.Popen(stage_command(tiny_copy, "train@udddm"), cwd=tiny_copy,
                                 env=run_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        client = MlflowClient(uri)
        deadline = time.time() + 300
        while time.time() < deadline and train.poll() is None:  # until the run has logged a first loss
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                break
            time.sleep(0.2)
        assert train.poll() is None, "training ended before the server could be killed"
        kill_server(server)
        _, stderr = train.communicate(timeout=600)
    finally:
        kill_server(server)
    assert train.returncode == 0, stderr[-3000:]
    out = tiny_copy / "out/train/udddm"
    assert load_model(out / "model.pt").method.name == "udddm"
    assert len((out / "loss.tsv").read_text().splitlines()) == 1 + 8 * 29
    assert stderr.count(f"MLflow tracking at {uri} failed") == 1, stderr[-3000:]
    assert stderr.count("is incomplete: not logged to") == 1
    reference = json.loads((out / "mlflow_run.json").read_text())
    assert "queued metrics" in reference["incomplete"] and "the model ema_model" in reference["incomplete"]
    assert "Traceback" not in stderr


def test_complete_run_logs_what_an_outage_kept_from_a_run_from_the_train_stage_s_files(tmp_path):
    """dddm.tracking.complete_run, as the register stage calls it after an outage: each metric's steps after the
    last one the run holds (loss.tsv; curve.tsv's points at their epoch's last step), the model from model.pt and
    the status; called again, it has nothing left to log."""
    from dddm.checkpoint import save_model
    from dddm.config import parse_config
    from dddm.data import PreparedInfo
    from dddm.tracking import complete_run
    from dddm.unet import build_network

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    for step in (1, 2):  # what got through before the server went away
        client.log_metric(run_id, "loss", 5.0 - step, step=step)
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.tsv").write_text("step\tepoch\tloss\tlr\n" + "".join(f"{s}\t{(s - 1) // 2}\t{5 - s}\t0.1\n"
                                                                  for s in range(1, 5)))
    (out / "curve.tsv").write_text("epoch\timages\tfid_classifier_1step\n2\t3594\t50.0\n")
    cfg = parse_config(tiny_params())
    info = PreparedInfo(source="digits", num_samples=1797, image_size=8, channels=1, num_classes=10, fingerprint="f")
    save_model(out / "model.pt", cfg, "udddm", info, build_network(cfg.model, 8, 1, "cross_attention"), images=3594)

    # epoch and lr at steps 1 to 4, loss at 3 and 4, the curve point's images and FID at step 4 (epoch 2's last)
    assert complete_run(out, uri, run_id) == ["12 metrics", "the model ema_model", "its status"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "curve/fid_classifier_1step")] == [(4, 50.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert complete_run(out, uri, run_id) == []


def test_metrics_queued_while_the_server_is_away_are_sent_when_it_returns(tmp_path, monkeypatch, caplog):
    """A real server killed with kill -9 and started again on the same port and store: the run ends
    with every step's metric and its status, and the outage was two warnings."""
    from dddm.tracking import MlflowTracker

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)  # the tracker sets them; monkeypatch restores them
    port = free_port()
    server, uri = start_mlflow_server(tmp_path, port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        tracker = MlflowTracker("comes-back", {"a": 1}, {}, flush_every=1)
        tracker.retry_after_s = 0
        for step in range(1, 11):
            tracker.log_metrics({"loss": step}, step)
        kill_server(server)
        with caplog.at_level("WARNING", logger="dddm.tracking"):
            for step in range(11, 21):
                tracker.log_metrics({"loss": step}, step)
            assert len(tracker._pending) == 10
            server, _ = start_mlflow_server(tmp_path, port)
            for step in range(21, 31):
                tracker.log_metrics({"loss": step}, step)
            tracker.finish()
        client = MlflowClient(uri)
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == list(range(1, 31))
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        kill_server(server)
    away, back = [r.message for r in caplog.records]
    assert away.startswith(f"MLflow tracking at {uri} failed logging the metrics (")
    assert re.fullmatch(rf"MLflow tracking at {uri} answers again after \d+ s; the queued metrics are sent", back)
    assert tracker.incomplete() is None
