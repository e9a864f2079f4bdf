"""`python -m pipeline.prune`: removes the checkpoint directories of configurations params.yaml no longer
has, keeping the current ones, the newest others asked for, and any a trainer is running in."""

import json
import os
import subprocess
import sys
import time

import yaml

from conftest import ROOT, tiny_params
from dddm import runlock
from dddm.config import parse_config
from dddm.training import run_directory

INFO = {"fingerprint": "abc123", "image_size": 8, "channels": 1}  # what prune reads of data/prepared.json


def workspace(tmp_path):
    """tmp_path as a repository prune runs in: the tiny params (checkpoints under ./checkpoints) and the
    prepared file's info; returns the params as prune reads them."""
    params = tiny_params(train={"checkpoint_dir": "checkpoints"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared.json").write_text(json.dumps(INFO))
    return parse_config(params, "params.yaml")


def test_prune_keeps_the_current_configurations_and_removes_the_rest(tmp_path):
    cfg = workspace(tmp_path)
    current = [tmp_path / run_directory(cfg, m, "abc123") for m in cfg.methods]
    stale = [tmp_path / "checkpoints" / f"udddm-{i:016x}" for i in range(4)]
    for directory in current + stale:
        (directory / "ckpt-10").mkdir(parents=True)
        (directory / "ckpt-10" / "model.pt").write_bytes(b"x" * 300_000)

    def prune(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.prune", *args], cwd=tmp_path, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout

    with runlock.hold_here(stale[0]):  # a trainer running there
        for i, directory in enumerate(current + stale):  # stale[3] is the newest directory
            os.utime(directory, (time.time() - 100 + i, time.time() - 100 + i))
        listed = prune("--keep", "1")
        assert "would free 0.6 MB" in listed and f"keep {stale[3]} (one of the 1 newest others)" in listed
        assert all(d.is_dir() for d in current + stale)  # without --delete nothing is removed
        said = prune("--keep", "1", "--delete")
    assert all(d.is_dir() for d in current) and stale[3].is_dir() and stale[0].is_dir()
    assert not stale[1].exists() and not stale[2].exists()
    assert f"keep {stale[0]}: " in said and "another trainer is running" in said and "freed 0.6 MB" in said


def test_a_symbolic_link_among_the_run_directories_is_kept_and_the_others_pruned(tmp_path):
    """The issue's trial: `--delete` met a run directory that is a symbolic link (rmtree refuses one), stopped with a
    traceback and left the other prunable directory. A link to a current run directory counts as current."""
    cfg = workspace(tmp_path)
    elsewhere = tmp_path / "big-disk"
    targets = [elsewhere / "old-run", elsewhere / run_directory(cfg, cfg.methods[0], "abc123").name]
    for target in targets:
        (target / "ckpt-10").mkdir(parents=True)
        (target / "ckpt-10" / "model.pt").write_bytes(b"x" * 1000)
    root = tmp_path / "checkpoints"
    root.mkdir()
    linked, current = root / "udddm-0000000000000001", tmp_path / run_directory(cfg, cfg.methods[0], "abc123")
    linked.symlink_to(targets[0])
    current.symlink_to(targets[1])
    stale = [root / f"udddm-{i:016x}" for i in (2, 3)]
    for directory in stale:
        (directory / "ckpt-10").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "pipeline.prune", "--delete"], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert f"keep {linked}: a symbolic link to {targets[0]}; remove the two yourself if unused" in done.stdout
    assert f"keep {current.resolve()} (params.yaml's configuration)" in done.stdout
    assert not any(d.exists() for d in stale) and linked.is_symlink() and all(t.is_dir() for t in targets)


def test_the_fine_tuned_methods_current_directories_are_kept(tmp_path, monkeypatch):
    """ECT's and CD's directories are named by the model they start from (and CD's teacher): prune once took them
    for stale ones. Without that model file their current directory cannot be told, and all of theirs stay."""
    from dddm.checkpoint import save_model
    from dddm.data import PreparedInfo
    from dddm.finetune import load_initialisation, load_teacher
    from dddm.unet import build_network

    cfg = workspace(tmp_path)
    root = tmp_path / "checkpoints"
    stale = [root / f"{m}-{i:016x}" for m in ("ect", "cd") for i in range(2)]
    for directory in stale:
        directory.mkdir(parents=True)

    def prune():
        return subprocess.run([sys.executable, "-m", "pipeline.prune", "--delete"], cwd=tmp_path, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120, check=True).stdout

    said = prune()  # no out/train/edm/model.pt yet: every ect-* and cd-* directory stays
    assert all(d.is_dir() for d in stale) and "keep every ect-* directory" in said and "keep every cd-* directory" in said
    edm = tmp_path / "out/train/edm/model.pt"
    edm.parent.mkdir(parents=True)
    info = PreparedInfo(source="digits", num_samples=1797, image_size=8, channels=1, num_classes=10,
                        fingerprint="abc123")
    save_model(edm, cfg, "edm", info, build_network(cfg.model, 8, 1, "none"), images=1797)
    monkeypatch.chdir(tmp_path)  # finetune.init_from and finetune.teacher are relative to the repository
    current = []
    for name in ("ect", "cd"):
        method = cfg.make_method(name)
        teacher = load_teacher(cfg, method, 8, 1) if method.distills_from else None
        current.append(root / run_directory(cfg, name, "abc123", load_initialisation(cfg, method, 8, 1), teacher).name)
    for directory in current:
        directory.mkdir()
    said = prune()
    assert all(d.is_dir() for d in current) and not any(d.exists() for d in stale), said
