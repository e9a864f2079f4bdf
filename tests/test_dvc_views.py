"""What DVC shows of the committed outputs (dvc.lock and out/, no repro): metrics files hold only metrics,
`dvc plots show` has the comparison plots and no others, and the score stage's printed summary."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

METHODS = ("udddm", "ict", "edm", "ect", "cd")  # ect, cd: fine-tuned from edm's model (cd distilling it)
# information, not metrics: they live in report.json and train_info.json, never in a metrics file
NOT_METRICS = {"feature_network", "num_samples", "num_reference", "inception_weights", "classifier_test_accuracy",
               "is_classifier", "nfe", "steps", "weight", "levels", "guide", "iterative", "class_histogram"}


def dvc_json(*args: str) -> dict:
    shown = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_metrics_files_hold_only_metrics():
    files = dvc_json("metrics", "show")[""]["data"]
    assert set(files) == {"out/real/metrics.json", "out/headline.json",
                          *(f"out/{stage}/{m}/{name}" for m in METHODS for stage, name in
                            (("train", "train_metrics.json"), ("score", "metrics.json")))}
    for path, shown in files.items():
        assert "error" not in shown, (path, shown)
        rows = shown["data"]
        keys = set(rows) if "train/" in path else {k for row in rows.values() if isinstance(row, dict) for k in row}
        assert keys and not keys & NOT_METRICS, (path, keys & NOT_METRICS)
    assert files["out/score/edm/metrics.json"]["data"]["nfe35"].keys() == {"fid_classifier", "precision", "recall",
                                                                            "classes"}
    assert files["out/train/udddm/train_metrics.json"]["data"].keys() == {"loss"}
    fid = {m: {row: numbers["fid_classifier"] for row, numbers in files[f"out/score/{m}/metrics.json"]["data"].items()
               if row.startswith("nfe")} for m in METHODS}
    assert files["out/headline.json"]["data"] == fid | {"real": files["out/real/metrics.json"]["data"]["real"]
                                                        ["fid_classifier"]}
    info = json.loads((ROOT / "out/train/udddm/train_info.json").read_text())  # beside it, not declared a metric
    assert info.keys() == {"guide", "iterative", "weight", "steps"}


def test_exp_show_of_the_committed_default_fits_200_columns():
    shown = subprocess.run([sys.executable, "-m", "pipeline.exp", "show", "--md"], cwd=ROOT, capture_output=True,
                           text=True)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["Experiment", "Created", "real", "udddm.nfe1", "udddm.nfe2", "ict.nfe1", "ict.nfe2", "edm.nfe35",
                      "ect.nfe1", "ect.nfe2", "cd.nfe1", "cd.nfe2"]
    assert max(len(line) for line in lines) <= 200, shown.stdout


def test_plots_are_the_comparison_plots_and_the_loss_curves_only():
    shown = dvc_json("plots", "show")
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    assert set(plots) == {"fid_by_network_evaluations", "precision_recall", "learning_curves", "out/compare/grids.png",
                          "out/compare/learning_curves.png", *(f"out/train/{m}/loss.tsv" for m in METHODS)}
    assert plots["out/compare/grids.png"][0]["type"] == "image"  # `dvc plots diff` shows revisions side by side
    pr = plots["precision_recall"][0]["content"]["encoding"]
    assert (pr["x"]["field"], pr["y"]["field"]) == ("recall", "precision")  # both 0..1, no FID on their axis
    fid = plots["fid_by_network_evaluations"][0]["content"]
    assert fid["encoding"]["x"]["field"] == "nfe"
    # one series per method (DVC keys a value `filename::field` when the plot reads two files)
    assert {v["filename::field"].split("::")[1] for v in fid["data"]["values"]} == set(METHODS)


@pytest.mark.parametrize("use_inception, found, reason", [
    ("never", None, "score.use_inception is never"),
    ("auto", None, "no Inception weights found (score.inception_weights: None)"),
])
def test_the_score_summary_names_the_feature_network_and_why(use_inception, found, reason):
    from types import SimpleNamespace

    from pipeline.score import feature_network_reason, summary

    row = {"feature_network": "classifier", "num_samples": 256, "inception_weights": found}
    said = feature_network_reason(row, SimpleNamespace(use_inception=use_inception, inception_weights=None))
    assert said == f"the scoring classifier's features (fid_classifier, not FID): {reason}"
    metrics = json.loads((ROOT / "out/score/ict/metrics.json").read_text())
    text = summary("ict", metrics, said).splitlines()
    assert text[0] == f"score: ict, {said}"
    assert text[1].split() == ["row", "fid_classifier", "precision", "recall", "classes"]
    assert text[2].split() == ["nfe1", f"{metrics['nfe1']['fid_classifier']:.4g}",
                               f"{metrics['nfe1']['precision']:.4g}", f"{metrics['nfe1']['recall']:.4g}",
                               str(metrics["nfe1"]["classes"])]
    assert text[4].split() == ["untrained", f"{metrics['untrained']['fid_classifier']:.4g}", "-", "-", "-"]


def test_the_committed_classifier_is_the_one_every_stage_recorded():
    """data/classifier.pt is in git (another CPU trains other weights): a fresh clone scores in this feature
    space, and the classifier, reference and score stages' records in dvc.lock name this file."""
    import hashlib

    import yaml

    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "data/classifier.pt"], cwd=ROOT,
                             capture_output=True, text=True)
    assert tracked.returncode == 0, tracked.stderr
    digest = hashlib.md5((ROOT / "data/classifier.pt").read_bytes()).hexdigest()
    stages = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    # the train stages use it too (learning curves); ECT's and CD's stages are the finetune matrix's
    users = {"classifier", "reference", *(f"{stage}@{m}" for m in METHODS[:3] for stage in ("train", "score")),
             *(f"{stage}@{m}" for m in METHODS[3:] for stage in ("finetune", "score_finetuned"))}
    recorded = {name: entry["md5"] for name in users for key in ("deps", "outs")
                for entry in stages[name].get(key, []) if entry["path"] == "data/classifier.pt"}
    assert recorded.keys() == users and set(recorded.values()) == {digest}


def test_the_comparison_table_prints_numbers_as_the_readme_does():
    from pipeline.compare import table

    rows = [("real digits (held out)", "-", {"nfe": 0, "fid_classifier": 4.0412, "precision": 0.8906, "classes": 10}),
            ("udddm", "1-step", {"nfe": 1, "fid_classifier": 1469.31, "precision": 0.0078, "classes": 2}),
            ("edm", "18-step", {"nfe": 35, "fid_classifier": 19.093, "precision": 0.6953, "classes": 10})]
    lines = table(rows).splitlines()
    assert lines[2] == "| real digits (held out) | - | 0 |  | 4.04 | 0.891 | 10 |"
    assert lines[3] == "| udddm | 1-step | 1 |  | 1469 | 0.0078 | 2 |"  # not 1.47e+03
    assert lines[4] == "| edm | 18-step | 35 |  | 19.1 | 0.695 | 10 |"
