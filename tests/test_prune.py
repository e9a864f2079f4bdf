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


def test_prune_keeps_the_current_configurations_and_removes_the_rest(tmp_path):
    params = tiny_params(train={"checkpoint_dir": "checkpoints"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared.json").write_text(json.dumps({"fingerprint": "abc123"}))
    cfg = parse_config(params, "params.yaml")
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
    params = tiny_params(train={"checkpoint_dir": "checkpoints"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared.json").write_text(json.dumps({"fingerprint": "abc123"}))
    cfg = parse_config(params, "params.yaml")
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
