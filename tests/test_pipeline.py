"""The DVC pipeline end to end: real `dvc repro` in a copy of the repository."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import dvc_run as dvc, run_env, stages_run, tiny_params, tiny_repo, write_params

pytestmark = pytest.mark.slow
METHODS = ("udddm", "ict", "edm", "ect", "cd")  # ect, cd: fine-tuned from edm's model (cd distilling it)


def ran(result) -> list[str]:
    return stages_run(result.stdout)


def snapshot(repo) -> dict[str, str]:
    """Every file under out/ and data/ with its content hash."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in ("out", "data") for p in sorted((repo / root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_data):
    """One tiny `dvc repro` of the whole graph, shared by the tests that only read or re-run it: the rest of the
    graph, in a copy of the session's tiny repository whose data stages have run (tiny_data, from nothing)."""
    repo = tiny_repo(tiny_data, tmp_path_factory.mktemp("pipeline") / "repo")
    first = dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return repo, first


def test_dvc_repro_trains_samples_and_scores_every_method_then_compares(reproduced, tiny_data):
    repo, first = reproduced
    assert stages_run(tiny_data[1]) == ["Running stage 'check':", "Running stage 'prepare':",
                                        "Running stage 'classifier':", "Running stage 'reference':"]
    assert stages_run(first.stdout)[0] == "Running stage 'train@udddm':", first.stdout  # the data stages are done
    info = json.loads((repo / "data/prepared.json").read_text())
    assert info["num_samples"] == 1797 and info["channels"] == 1 and info["image_size"] == 8
    nfe = {"udddm": (1, 2), "ict": (1, 2), "edm": (7,), "ect": (1, 2), "cd": (1, 2)}  # tiny: EDM with 4 Heun steps
    for name in METHODS:
        assert (repo / f"out/train/{name}/model.pt").is_file()
        assert "loss" in (repo / f"out/train/{name}/loss.tsv").read_text().splitlines()[0]
        curve = (repo / f"out/train/{name}/curve.tsv").read_text().splitlines()  # eval_every 1 of 1 epoch
        finetuned = name in METHODS[3:]  # a point for the model it starts from
        assert len(curve) == (3 if finetuned else 2) and curve[0].startswith("epoch\timages\tfid_classifier_")
        metrics = json.loads((repo / f"out/score/{name}/metrics.json").read_text())
        assert set(metrics) == {f"nfe{n}" for n in nfe[name]} | {"untrained"}, metrics
        for key, m in metrics.items():
            if key != "untrained":
                assert m["fid_classifier"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
                assert 0 <= m["classes"] <= 10
        report = json.loads((repo / f"out/score/{name}/report.json").read_text())
        assert all(sum(row["class_histogram"]) == 160 for row in report["rows"])
        assert ("diagnostics" in report) == (name == "udddm")
    images = np.load(repo / "out/samples/udddm/2-step.npz")["images"]
    assert images.shape == (160, 1, 8, 8) and images.dtype == np.uint8
    real = json.loads((repo / "out/real/metrics.json").read_text())["real"]
    untrained = json.loads((repo / "out/score/edm/metrics.json").read_text())["untrained"]
    assert 1 <= real["classes"] <= 10 and real["fid_classifier"] < untrained["fid_classifier"]  # the floor
    table = (repo / "out/compare/table.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS[:3]) and "real digits" in table
    assert "| ect (from edm's model, 1,797 images) | 1-step | 1 | 3,594 |" in table  # its images include EDM's
    # CD distils the model it starts from: its images counted once
    assert "| cd (from edm's model, distilling edm's, 1,797 images) | 1-step | 1 | 3,594 |" in table
    assert (repo / "out/compare/grids.png").stat().st_size > 0
    assert (repo / "out/compare/learning_curves.png").stat().st_size > 0
    registered = json.loads((repo / "out/registry.json").read_text())["registered"]  # tracking.register_models: true
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db", registry_uri=f"sqlite:///{repo}/mlflow.db")
    for name in METHODS:
        scores = json.loads((repo / f"out/score/{name}/metrics.json").read_text())
        row = "nfe7" if name == "edm" else "nfe1"
        entry = registered[name]
        assert entry["metric"] == f"{row}/fid_classifier" and entry["score"] == scores[row]["fid_classifier"]
        assert entry["moved"] and entry["version"] == "1"  # the first: it becomes the champion
        champion = client.get_model_version_by_alias(f"{name}-digits", "champion")
        run = json.loads((repo / f"out/train/{name}/mlflow_run.json").read_text())["run_id"]
        assert champion.run_id == run and float(champion.tags["score"]) == entry["score"]
    shown = dvc(repo, "metrics", "show")
    assert "nfe35" not in shown.stdout and "nfe7.fid_classifier" in shown.stdout, shown.stdout + shown.stderr


def column(value: dict) -> str:
    """The TSV column of a plotted value (DVC keys it `filename::field` when a plot reads several files)."""
    return value["field"] if "field" in value else value["filename::field"].split("::")[1]


def test_plots_compare_the_methods(reproduced):
    repo, _ = reproduced
    shown = dvc(repo, "plots", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    plots = json.loads(shown.stdout)["data"]
    loss = {f"out/train/{name}/loss.tsv" for name in METHODS}
    assert set(plots) == loss | {"fid_by_network_evaluations", "precision_recall", "learning_curves",
                                 "out/compare/grids.png", "out/compare/learning_curves.png"}
    assert plots["out/compare/grids.png"][0]["type"] == "image"  # `dvc plots diff` shows revisions side by side
    fid = plots["fid_by_network_evaluations"][0]["content"]
    points = {(column(v), v["nfe"]) for v in fid["data"]["values"] if v["dvc_inferred_y_value"] != "NaN"}
    assert points == {("udddm", "1"), ("udddm", "2"), ("ict", "1"), ("ict", "2"), ("edm", "7"), ("ect", "1"), ("ect", "2"),
                      ("cd", "1"), ("cd", "2")}
    curves = plots["learning_curves"][0]["content"]["data"]["values"]
    assert {(column(v), v["images"]) for v in curves if v["dvc_inferred_y_value"] != "NaN"} == \
        {("udddm", "1797"), ("ict", "1797"), ("edm", "1797"), ("ect", "1797"), ("ect", "3594"), ("cd", "1797"),
         ("cd", "3594")}
    pr = plots["precision_recall"][0]["content"]
    assert pr["encoding"]["x"]["field"] == "recall"  # precision against recall: both on 0..1, no FID beside them
    assert {v["point"] for v in pr["data"]["values"]} == {"real digits (held out) -", "udddm 1-step", "udddm 2-step",
                                                           "ict 1-step", "ict 2-step", "edm 4-step",
                                                           "ect 1-step", "ect 2-step", "cd 1-step", "cd 2-step"}
    # `python -m pipeline.plots`: the same page with vega, vega-lite and vega-embed inline, nothing from a CDN
    offline = subprocess.run([sys.executable, "-m", "pipeline.plots", "-o", "offline_plots"], cwd=repo, env=run_env(),
                             capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stderr
    page = (repo / "offline_plots" / "index.html").read_text()
    charts = len(METHODS) + 3  # a loss chart per method, the three comparisons
    assert "<script src" not in page and "window.vegaEmbed=" in page and page.count("vegaEmbed('#") == charts


def kept_files(repo) -> dict:
    """params.yaml, dvc.lock and every file under out/, with their bytes (the cache: false outputs have no copy in
    DVC's cache, so `dvc checkout` cannot bring them back)."""
    return {p: p.read_bytes() for p in [repo / "params.yaml", repo / "dvc.lock", *(repo / "out").rglob("*")]
            if p.is_file()}


def restore(repo, kept: dict) -> None:
    """The workspace as kept_files found it: the files it kept, and no file under out/ it did not keep."""
    for path in (repo / "out").rglob("*"):
        if path.is_file() and path not in kept:
            path.unlink()
    for path, content in kept.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_second_repro_is_a_noop_and_a_sampler_change_reruns_only_that_method(reproduced):
    repo, _ = reproduced
    # the stages ran with bytecode writing on (run_env), so the code deps hold fresh __pycache__ dirs
    assert list((repo / "dddm").glob("__pycache__/*.pyc")) and list((repo / "pipeline").glob("__pycache__/*.pyc"))
    again = dvc(repo, "repro")
    assert again.returncode == 0, again.stderr
    assert ran(again) == [], again.stdout
    status = dvc(repo, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    kept = kept_files(repo)
    write_params(repo, tiny_params(sampler={"ict": {"steps": [1]}}))
    try:
        third = dvc(repo, "repro")
        assert third.returncode == 0, third.stderr
        assert ran(third) == ["Running stage 'check':", "Running stage 'sample@ict':", "Running stage 'score@ict':",
                              "Running stage 'compare':", "Running stage 'register':"], third.stdout
        assert not (repo / "out/samples/ict/2-step.npz").exists()
    finally:
        restore(repo, kept)  # the next tests start from the tiny params' outputs, without a repro back to them


INVALID = [  # (mutation of the tiny params, the key the error must name)
    ({"train": {"epochs": -1}}, "train.epochs"), ({"train": {"epochs": True}}, "train.epochs"),
    ({"train": {"epochs": "3"}}, "train.epochs"), ({"train": {"nproc": 0}}, "train.nproc"),
    ({"train": {"nproc": "two"}}, "train.nproc"), ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"batch_size": 0}}, "train.batch_size"), ({"train": {"device": "tpu"}}, "train.device"),
    ({"train": {"device": "cuda"}}, "train.device"), ({"train": {"resume": "maybe"}}, "train.resume"),
    ({"train": {"checkpoint_dir": "/proc/nope"}}, "train.checkpoint_dir"),
    ({"train": {"ema_decay": 1.5}}, "train.ema_decay"), ({"train": {"epoch": 2}}, "train.epoch"),
    ({"bogus": 1}, "bogus"), ({"seed": -3}, "seed"), ({"seed": 1.5}, "seed"),
    ({"data": {"source": "mnist"}}, "data.source"), ({"data": {"image_size": 4}}, "data.image_size"),
    ({"data": {"source": "cifar10", "path": None}}, "data.path"),
    ({"model": {"num_heads": 3}}, "model.num_heads"), ({"model": {"channel_mult": []}}, "model.channel_mult"),
    ({"model": {"dropout": 1.0}}, "model.dropout"), ({"model": {"attn_resolutions": [3]}}, "model.attn_resolutions"),
    ({"method": {"udddm": {"process": "subvp"}}}, "method.udddm.process"),
    ({"method": {"udddm": {"n_counts": "batch"}}}, "method.udddm.n_counts"),
    ({"method": {"udddm": {"store": {"budget_fraction": 0}}}}, "method.udddm.store.budget_fraction"),
    ({"method": {"ict": {"store": {"policy": "arrow"}}}}, "method.ict.store"),
    ({"method": {"edm": {"process": "ve"}}}, "method.edm.process"),
    ({"method": {"ict": {"s0": 0}}}, "method.ict.s0"), ({"sampler": {"edm": {"steps": []}}}, "sampler.edm.steps"),
    ({"sampler": {"ict": {"steps": [1, 2, 3]}}}, "sampler.ict"), ({"sample": {"num_samples": 0}}, "sample.num_samples"),
    ({"score": {"use_inception": "sometimes"}}, "score.use_inception"),
    ({"tracking": {"experiment": ""}}, "tracking.experiment"),
]


def test_the_check_names_the_key_of_each_invalid_param(tmp_path):
    """What the check stage runs (load params.yaml, then what this machine cannot give) on each mutation."""
    from dddm.config import ConfigError, load_config
    from pipeline.check import environment_problems

    for mutation, key in INVALID:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(tiny_params(**mutation), sort_keys=False))
        try:
            said = "\n".join(environment_problems(load_config(path)))
        except ConfigError as e:
            said = str(e)
        assert key in said, (mutation, said)
    assert len(INVALID) >= 30


def test_invalid_params_stop_before_any_output_is_removed(reproduced):
    """An invalid params.yaml stops `dvc repro` in the check stage, naming the key, with every file under
    out/ and data/ byte-identical afterwards: a type error, a value the machine cannot give, a missing path."""
    repo, _ = reproduced
    before = snapshot(repo)
    assert len(before) > 30
    for mutation, key in (INVALID[2], INVALID[10], INVALID[18]):  # epochs "3", /proc/nope, cifar10 without a path
        write_params(repo, tiny_params(**mutation))
        result = dvc(repo, "repro")
        text = result.stdout + result.stderr
        assert result.returncode != 0, (mutation, text[-2000:])
        assert key in text, (mutation, text[-2000:])
        assert snapshot(repo) == before, mutation
    write_params(repo, tiny_params())


class Recorder:
    """A logger for flows.dvcrun.run that keeps what it is given, by level."""

    def __init__(self):
        self.records = []

    def info(self, msg, *args):
        self.records.append(("INFO", msg % args if args else msg))

    def error(self, msg, *args):
        self.records.append(("ERROR", msg % args if args else msg))


def test_a_failing_stage_s_own_message_is_the_task_s_failure_message(reproduced):
    """What a Prefect stage task fails with (its state message) and logs as ERROR: the stage's own line,
    not DVC's "failed to reproduce" or torchrun's ChildFailedError traceback."""
    from flows.dvcrun import StageFailed, run

    repo, _ = reproduced
    # what the failures change: the check stage passes the second case's params and records them in dvc.lock;
    # the failed train stage removes its outputs, the cache: false ones (train_info.json, ...) with no copy in DVC's cache
    kept = kept_files(repo)
    cases = [(tiny_params(train={"epochs": 0}), "check", "train.epochs"),
             (tiny_params(train={"epochs": 2, "lr": 1e30}), "train@udddm", "non-finite loss")]  # under torchrun
    try:
        for params, stage, key in cases:
            write_params(repo, params)
            logger = Recorder()
            with pytest.raises(StageFailed) as failed:
                run(["repro", stage], repo, logger, what=f"stage {stage}")
            message = str(failed.value)
            first = message.split(": ", 1)[1]
            assert first.startswith(f"{stage.split('@')[0]}: ") and key in message.splitlines()[0] + message, message
            assert "ChildFailedError" not in message and "failed to reproduce" not in message, message
            errors = [text for level, text in logger.records if level == "ERROR"]
            assert len(errors) == 1 and key in errors[0], logger.records[-5:]
    finally:
        restore(repo, kept)  # the next tests read them
        assert "up to date" in dvc(repo, "status").stdout


def test_dvc_exp_run_switches_the_process_and_a_bad_source_is_named(reproduced):
    repo, _ = reproduced
    write_params(repo, tiny_params())
    git = dict(cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny", "--allow-empty"], **git)
    before = snapshot(repo)
    refused = dvc(repo, "exp", "run", "-S", "train.epochs=-1")
    assert refused.returncode != 0 and "train.epochs" in refused.stdout + refused.stderr
    assert snapshot(repo) == before
    write_params(repo, tiny_params())  # DVC leaves its -S edit in params.yaml after a failed run
    exp = dvc(repo, "exp", "run", "-S", "method.udddm.process=ve")
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert [line for line in ran(exp) if "@" in line and "compare" not in line] == \
        ["Running stage 'train@udddm':", "Running stage 'sample@udddm':", "Running stage 'score@udddm':"], exp.stdout
    model = torch.load(repo / "out/train/udddm/model.pt", weights_only=False)
    assert model["params"]["method"]["udddm"]["process"] == "ve"
    shown = subprocess.run([sys.executable, "-m", "pipeline.exp", "show", "--md"], cwd=repo, env=run_env(),
                           capture_output=True, text=True, timeout=300)  # markdown: the table's full width
    assert shown.returncode == 0, shown.stderr
    header = [cell.strip() for cell in shown.stdout.splitlines()[0].strip("|").split("|")]
    assert header == ["Experiment", "Created", "real", "udddm.nfe1", "udddm.nfe2", "ict.nfe1", "ict.nfe2", "edm.nfe7",
                      "ect.nfe1", "ect.nfe2", "cd.nfe1", "cd.nfe2", "method.udddm.process"], header  # the changed param and the FIDs; no hashes
    assert max(len(line) for line in shown.stdout.splitlines()) <= 200

    missing = repo / "nowhere" / "cifar-10-python.tar.gz"
    write_params(repo, tiny_params(data={"source": "cifar10", "path": str(missing)}))
    bad = dvc(repo, "repro", "prepare")
    assert bad.returncode != 0
    assert "cifar10" in bad.stderr and str(missing) in bad.stderr, bad.stderr[-2000:]


def test_a_second_clone_pulls_from_a_dvc_remote_reproduces_nothing_and_pulls_an_experiment(reproduced, tmp_path):
    """A shared directory as the DVC remote and a bare git repository as the git remote, standing in for
    S3/GCS/SSH and a git server: what one clone pushes, another pulls, and `dvc repro` there does nothing."""
    repo, _ = reproduced
    git = dict(cwd=repo, check=True, capture_output=True)
    # back to the committed baseline (the previous test left an experiment applied and a failed prepare)
    subprocess.run(["git", "checkout", "--", "."], **git)
    assert dvc(repo, "checkout", "--force").returncode == 0
    assert "up to date" in dvc(repo, "status").stdout
    assert dvc(repo, "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")).returncode == 0
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "remote"], **git)
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], **git)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], **git)
    pushed = dvc(repo, "push")
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    [experiment] = [line.split()[0] for line in dvc(repo, "exp", "ls", "--all-commits", "--name-only").stdout.splitlines()
                    if line.strip()][:1]  # the experiment of the previous test (process ve)
    # DVC reads an experiment's remotes from its own commit, which predates the remote: name it locally too
    assert dvc(repo, "remote", "add", "--local", "shared", str(tmp_path / "dvc-remote")).returncode == 0
    assert dvc(repo, "exp", "push", "--remote", "shared", "origin", experiment).returncode == 0

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(tmp_path / "origin.git"), str(clone)], check=True)
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    again = dvc(clone, "repro")
    assert again.returncode == 0 and not ran(again), again.stdout[-3000:]
    assert snapshot(clone) == snapshot(repo)

    assert dvc(clone, "remote", "add", "--local", "shared", str(tmp_path / "dvc-remote")).returncode == 0
    assert dvc(clone, "exp", "pull", "--remote", "shared", "origin", experiment).returncode == 0
    applied = dvc(clone, "exp", "apply", experiment)
    assert applied.returncode == 0, applied.stderr[-2000:]
    model = torch.load(clone / "out/train/udddm/model.pt", weights_only=False)
    assert model["params"]["method"]["udddm"]["process"] == "ve"
