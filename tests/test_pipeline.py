"""The DVC pipeline end to end: real `dvc repro` in a copy of the repository."""

import json
import subprocess

import numpy as np
import torch
import pytest

from conftest import run_env, tiny_params, write_params

pytestmark = pytest.mark.slow


def dvc(repo, *args):
    return subprocess.run(["dvc", *args], cwd=repo, env=run_env(), capture_output=True, text=True, timeout=900)


def test_dvc_repro_end_to_end_then_noop_then_sample_only(repo_copy):
    write_params(repo_copy, tiny_params())
    first = dvc(repo_copy, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    info = json.loads((repo_copy / "data/prepared.json").read_text())
    assert info["num_samples"] == 1797 and info["channels"] == 1 and info["image_size"] == 8
    assert (repo_copy / "out/train/model.pt").is_file()
    assert "loss" in (repo_copy / "out/train/loss.tsv").read_text().splitlines()[0]
    for steps in (1, 2):
        images = np.load(repo_copy / f"out/samples/{steps}-step.npz")["images"]
        assert images.shape == (160, 1, 8, 8) and images.dtype == np.uint8
        assert (repo_copy / f"out/samples/{steps}-step.png").stat().st_size > 0

    again = dvc(repo_copy, "repro")
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout, again.stdout

    metrics = json.loads((repo_copy / "out/score/metrics.json").read_text())
    assert set(metrics) == {"1-step", "2-step", "untrained/1-step"}
    for name, m in metrics.items():
        assert m["feature_network"] == "classifier" and "fid" not in m, name
        assert m["fid_classifier"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert "fid_classifier" in (repo_copy / "out/score/by_steps.tsv").read_text()
    shown = dvc(repo_copy, "metrics", "show")
    assert "fid_classifier" in shown.stdout, shown.stdout + shown.stderr

    write_params(repo_copy, tiny_params(sample={"num_samples": 150}))
    third = dvc(repo_copy, "repro")
    assert third.returncode == 0, third.stderr
    ran = [line for line in third.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'sample':", "Running stage 'score':"], third.stdout
    assert np.load(repo_copy / "out/samples/1-step.npz")["images"].shape[0] == 150


def test_bad_parameter_stops_the_stage_naming_the_key(repo_copy):
    write_params(repo_copy, tiny_params(diffusion={"kind": "subvp"}))
    result = dvc(repo_copy, "repro")
    assert result.returncode != 0
    assert "diffusion.kind" in result.stderr + result.stdout


def test_dvc_exp_run_switches_to_ve_and_a_bad_source_is_named(repo_copy):
    write_params(repo_copy, tiny_params(score={"untrained_baseline": False}))
    git = dict(cwd=repo_copy, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], **git)
    exp = dvc(repo_copy, "exp", "run", "-S", "diffusion.kind=ve")
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    model = torch.load(repo_copy / "out/train/model.pt", weights_only=False)
    assert model["params"]["diffusion"]["kind"] == "ve"
    diff = dvc(repo_copy, "params", "diff").stdout  # the experiment is applied to the workspace
    assert "diffusion.kind" in diff and "ve" in diff.split("diffusion.kind")[1], diff

    missing = repo_copy / "nowhere" / "cifar-10-python.tar.gz"
    write_params(repo_copy, tiny_params(data={"source": "cifar10", "path": str(missing)}))
    bad = dvc(repo_copy, "repro", "prepare")
    assert bad.returncode != 0
    assert "cifar10" in bad.stderr and str(missing) in bad.stderr, bad.stderr[-2000:]
