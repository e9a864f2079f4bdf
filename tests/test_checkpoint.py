"""Checkpoints: manifest, keep K, fall back past a damaged one, weights_only loading, history tail.

A run "interrupted" after epoch 1 is a run of 1 epoch (everything is keyed by seed, epoch and
index, and the lr does not depend on the run's length): resuming its checkpoints with 2 epochs
must end bit-for-bit where an uninterrupted 2-epoch run ends, whatever was done to the newest
checkpoint. Every damaged-file case is counted in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_identical, result_of, run_env, tiny_params, write_params
from dddm import checkpoint
from dddm.checkpoint import CheckpointError
from dddm.config import parse_config
from dddm.data import prepare_dataset
from dddm.training import train

STEPS_PER_EPOCH = 8  # 1797 digits, batch 256


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prepared.arrow"
    prepare_dataset("digits", None, 8, path, progress=False)
    return path


def config(policy: str, epochs: int, **train_overrides):
    return parse_config(tiny_params(train={"epochs": epochs, "batch_size": 256, "checkpoint_every": 3,
                                           "keep_checkpoints": 2, **train_overrides},
                                    model={"dropout": 0.2}, method={"udddm": {"store": {"policy": policy}}}))


@dataclass
class Runs:
    policy: str
    prepared: Path
    whole: dict  # the uninterrupted 2-epoch result
    half: Path  # the run directory of the run interrupted after epoch 1


@pytest.fixture(scope="module", params=["device", "arrow"])
def runs(request, prepared, tmp_path_factory) -> Runs:
    policy, root = request.param, tmp_path_factory.mktemp(request.param)
    whole = result_of(train(config(policy, 2), "udddm", prepared, root / "whole-out", root / "whole", progress=False))
    train(config(policy, 1), "udddm", prepared, root / "half-out", root / "half", progress=False)
    return Runs(policy, prepared, whole, root / "half")


def interrupted(runs: Runs, tmp_path) -> Path:
    """A private copy of the interrupted run directory, its Arrow store file included (a checkpoint
    knows that file by the id written into it, not by its path)."""
    shutil.copytree(runs.half, tmp_path / "run")
    return tmp_path / "run"


def resume(runs: Runs, run_dir: Path, tmp_path, epochs: int = 2, **train_overrides) -> dict:
    return result_of(train(config(runs.policy, epochs, **train_overrides), "udddm", runs.prepared, tmp_path / "out", run_dir,
                           progress=False))


def rewrite_manifest(ckpt: Path) -> None:
    """What someone who can write the run directory can do: a manifest matching the files as they are."""
    m = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    checkpoint._write_manifest(ckpt, m["step"], m["world_size"], m["store_backend"])


def test_a_run_keeps_its_newest_k_checkpoints_each_with_a_manifest(runs):
    done = checkpoint.complete(runs.half)
    assert [p.name for p in done] == ["ckpt-000000006", "ckpt-000000008"]
    for ckpt in done:
        manifest = checkpoint.verify(ckpt)
        assert set(manifest["files"]) == {"train_state.pt", "rank0.pt"} and manifest["store_backend"] == runs.policy
    assert not list(runs.half.glob("*.tmp"))


def test_resume_from_the_newest_checkpoint_is_bit_identical(runs, tmp_path):
    assert_identical(resume(runs, interrupted(runs, tmp_path), tmp_path), runs.whole)


def damage_truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def damage_empty(f: Path) -> None:
    f.write_bytes(b"")


def damage_garble(f: Path) -> None:
    data = bytearray(f.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = os.urandom(64)
    f.write_bytes(bytes(data))


DAMAGES = {"truncated": damage_truncate, "empty": damage_empty, "garbled": damage_garble}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["train_state.pt", "rank0.pt"])
def test_a_damaged_newest_checkpoint_is_skipped_by_name(runs, tmp_path, caplog, damage, name):
    """Device store: resume from the older checkpoint, bit-identical. Arrow store: the older one's
    estimates may have been overwritten by the next epoch, so a clear error naming both."""
    run_dir = interrupted(runs, tmp_path)
    DAMAGES[damage](run_dir / "ckpt-000000008" / name)
    caplog.set_level(logging.WARNING, logger="dddm.checkpoint")
    if runs.policy == "arrow":
        with pytest.raises(CheckpointError, match=r"ckpt-000000008: does not verify, and the older .*ckpt-000000006 "
                                                  r"cannot be resumed.*delete"):
            resume(runs, run_dir, tmp_path)
        return
    result = resume(runs, run_dir, tmp_path)
    assert f"skipping checkpoint {run_dir / 'ckpt-000000008'}: {run_dir / 'ckpt-000000008' / name}" in caplog.text
    assert_identical(result, runs.whole)


@pytest.mark.parametrize("change", ["missing", "sha256", "not json"])
def test_a_manifest_that_does_not_match_is_skipped(runs, tmp_path, caplog, change):
    run_dir = interrupted(runs, tmp_path)
    manifest = run_dir / "ckpt-000000008" / checkpoint.MANIFEST
    if change == "missing":
        manifest.unlink()
    elif change == "sha256":
        m = json.loads(manifest.read_text())
        m["files"]["train_state.pt"]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(m))
    else:
        manifest.write_text("{\"files\": ")
    with pytest.raises(CheckpointError, match="manifest|sha256|missing"):
        checkpoint.verify(run_dir / "ckpt-000000008")
    if runs.policy == "device":
        caplog.set_level(logging.WARNING, logger="dddm.checkpoint")
        assert_identical(resume(runs, run_dir, tmp_path), runs.whole)
        assert "skipping checkpoint" in caplog.text and "manifest.json" in caplog.text


def test_a_run_trained_to_its_end_trains_nothing_and_says_how_to_train_it_again(runs, tmp_path, caplog):
    run_dir = interrupted(runs, tmp_path)  # its 1 epoch done
    caplog.set_level(logging.INFO, logger="dddm.training")
    assert resume(runs, run_dir, tmp_path, epochs=1)["step"] == STEPS_PER_EPOCH
    said = [r.getMessage() for r in caplog.records if r.name == "dddm.training" and "resume" in r.getMessage()]
    assert said == [f"udddm: this configuration was trained to the end before ({run_dir / 'ckpt-000000008'}, step 8 "
                    f"of 8); nothing is trained, its model is written again. To train it again from step 0, delete "
                    f"{run_dir} or set train.resume: never"]


def test_no_checkpoint_verifies_trains_from_step_0_and_says_so(runs, tmp_path, caplog):
    run_dir = interrupted(runs, tmp_path)
    for ckpt in checkpoint.complete(run_dir):
        damage_garble(ckpt / "train_state.pt")
    caplog.set_level(logging.WARNING, logger="dddm.checkpoint")
    assert_identical(resume(runs, run_dir, tmp_path), runs.whole)
    assert "no checkpoint in" in caplog.text and "ckpt-000000008, ckpt-000000006" in caplog.text


class _Payload:
    """Unpickling this runs a shell command that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# a raw pickle at Python's default protocol makes torch's weights-only unpickler warn before it refuses
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
@pytest.mark.parametrize("name", ["train_state.pt", "model.pt"])
def test_a_crafted_pickle_is_refused_without_running_anything(runs, tmp_path, fmt, name):
    """Even with a manifest that matches it (an attacker can rewrite both), the file is loaded with
    weights_only=True: refused, naming it, and the command never runs."""
    marker = tmp_path / "marker"
    payload = {"step": 8, "world_size": 1, "model": _Payload(marker)}
    if name == "model.pt":
        target = tmp_path / "model.pt"
    else:
        run_dir = interrupted(runs, tmp_path)
        target = run_dir / "ckpt-000000008" / name
    with open(target, "wb") as f:
        torch.save(payload, f) if fmt == "torch.save" else pickle.dump(payload, f)
    if name == "model.pt":
        with pytest.raises(CheckpointError, match=f"{target}: not a readable model file"):
            checkpoint.load_model(target)
    else:
        rewrite_manifest(target.parent)
        with pytest.raises(CheckpointError, match=f"{target}: not a readable training state"):
            resume(runs, run_dir, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_model_file_is_an_error_naming_it(runs, tmp_path, damage):
    model = runs.half.parent / "half-out" / "model.pt"
    checkpoint.load_model(model)
    copy = tmp_path / "model.pt"
    shutil.copy(model, copy)
    DAMAGES[damage](copy)
    with pytest.raises(CheckpointError, match=f"^{copy}: (not a readable model file|the weights do not match)"):
        checkpoint.load_model(copy)


def test_a_torn_last_history_line_is_dropped_on_resume(runs, tmp_path, caplog):
    run_dir = interrupted(runs, tmp_path)
    with open(run_dir / "history.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 1, "lo')
    caplog.set_level(logging.WARNING, logger="dddm.training")
    assert_identical(resume(runs, run_dir, tmp_path), runs.whole)
    assert "torn last line" in caplog.text
    steps = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_train_metrics_are_complete_after_resuming_from_the_final_checkpoint(runs, tmp_path):
    run_dir = interrupted(runs, tmp_path)
    first = {name: json.loads((runs.half.parent / "half-out" / name).read_text())
             for name in ("train_metrics.json", "train_info.json")}
    resume(runs, run_dir, tmp_path, epochs=1)  # nothing left to train
    again = {name: json.loads((tmp_path / "out" / name).read_text()) for name in first}
    assert again == first and again["train_metrics.json"].keys() == {"loss"}
    assert again["train_info.json"].keys() == {"guide", "iterative", "weight", "steps"}


def test_a_new_checkpoint_that_does_not_verify_leaves_the_older_ones(runs, tmp_path, monkeypatch):
    run_dir = interrupted(runs, tmp_path)
    before = {p.name for p in checkpoint.complete(run_dir)}
    real_write = checkpoint._write_manifest

    def write_then_damage(ckpt, *args):  # the disk returns other bytes than were written
        real_write(ckpt, *args)
        damage_garble(ckpt / "train_state.pt")

    monkeypatch.setattr(checkpoint, "_write_manifest", write_then_damage)
    with pytest.raises(CheckpointError, match="ckpt-000000009: just written, but it does not verify.*older "
                                              "checkpoints are kept"):
        resume(runs, run_dir, tmp_path, checkpoint_every=1)
    assert before <= {p.name for p in checkpoint.complete(run_dir)}


def test_the_sample_stage_names_a_truncated_model_file_without_a_traceback(runs, tmp_path):
    (tmp_path / "out" / "train" / "udddm").mkdir(parents=True)
    model = tmp_path / "out" / "train" / "udddm" / "model.pt"
    shutil.copy(runs.half.parent / "half-out" / "model.pt", model)
    damage_truncate(model)
    write_params(tmp_path, tiny_params())
    result = subprocess.run([sys.executable, "-m", "pipeline.sample", "--method", "udddm", "--runs", "out/train",
                             "--out", "out/samples"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env=run_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("sample: out/train/udddm/model.pt: not a readable model "
                                                             "file")
    assert "Traceback" not in result.stderr


def test_parts_left_by_a_write_killed_at_the_same_step_do_not_break_the_next_save(runs, tmp_path):
    """A kill inside a checkpoint write leaves ckpt-<step>.tmp with parts of files; the resumed run
    writes the same step into that directory again."""
    run_dir = interrupted(runs, tmp_path)
    stale = run_dir / "ckpt-000000009.tmp"
    stale.mkdir()
    for name in ("manifest.json.part", "train_state.pt.part", "rank0.pt"):
        (stale / name).write_bytes(b"left by a killed write")
    assert_identical(resume(runs, run_dir, tmp_path), runs.whole)
    assert [p.name for p in checkpoint.complete(run_dir)] == ["ckpt-000000015", "ckpt-000000016"]
    assert not stale.exists()


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file_and_the_space(prepared, tmpfs, tmp_path):
    """The issue's trial (a checkpoint directory on a file system that fills): one error naming the file,
    the free space and what the file needs, and no unfinished `ckpt-*.tmp` left behind."""
    run_dir = tmpfs("256k")
    with pytest.raises(CheckpointError) as failed:
        train(config("device", 1), "udddm", prepared, tmp_path / "out", run_dir, progress=False)
    message = str(failed.value)
    assert message.startswith(f"{run_dir}/ckpt-000000003.tmp/") and "\n" not in message
    assert "writing the checkpoint of step 3 failed" in message and "free there, the file needs about" in message
    assert not list(run_dir.glob("ckpt-*"))


def test_an_unfinished_checkpoint_directory_is_removed_at_the_next_start(runs, tmp_path):
    run_dir = interrupted(runs, tmp_path)
    (run_dir / "ckpt-000000009.tmp").mkdir()
    (run_dir / "ckpt-000000009.tmp" / "train_state.pt").write_bytes(b"part of a file")
    assert checkpoint.resumable(run_dir, STEPS_PER_EPOCH) == run_dir / "ckpt-000000008"
    assert not (run_dir / "ckpt-000000009.tmp").exists()


def test_a_model_trained_with_other_params_than_the_current_is_not_sampled_under_them(runs):
    """What guards the scores when dvc.lock records params a model was not trained with (an experiment
    that rewrote params.yaml during a run): the sample stage compares the model's params with them."""
    path = runs.half.parent / "half-out" / "model.pt"
    trained = checkpoint.load_model(path)
    same = config(runs.policy, 1, device="cpu", keep_checkpoints=5, log_every=7)  # keys that do not change the network
    checkpoint.check_trained_with(trained, same, path, "params.yaml")
    with pytest.raises(CheckpointError, match=rf"^{path}: was trained with other params than params.yaml holds "
                                              r"\(train.lr: 0.0002 in the model, 0.0005 now\); retrain it "
                                              r"\(`dvc repro -f train@udddm`\)"):
        checkpoint.check_trained_with(trained, config(runs.policy, 1, lr=5e-4), path, "params.yaml")
