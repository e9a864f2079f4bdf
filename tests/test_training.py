"""The training loop with real processes: torchrun DDP (two gloo ranks), kill -9 and resume, NaN."""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import ROOT, assert_identical, result_of, run_env, tiny_params
from dddm import checkpoint
from dddm.config import parse_config
from dddm.data import prepare_dataset
from dddm.methods import Progress
from dddm.distributed import torchrun_command
from dddm.store import owned_indices
from dddm.training import TrainingDiverged, epoch_batches, history_fields, train, write_history
from dddm.unet import build_network

WORKER = ROOT / "tests" / "train_worker.py"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prepared.arrow"
    prepare_dataset("digits", None, 8, path, progress=False)
    return path


def write(tmp_path, params) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_worker(params_file, prepared, out, run_dir, nproc=1, **popen):
    launcher = torchrun_command(nproc) if nproc > 1 else [sys.executable]
    cmd = [*launcher, str(WORKER), str(params_file), str(prepared), str(out), str(run_dir)]
    env = run_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    return result


def final_state(run_dir: Path, out: Path, nproc: int) -> dict:
    ckpt = checkpoint.latest(run_dir)
    shared = torch.load(ckpt / "train_state.pt", weights_only=True)
    estimates = [torch.load(out / f"final-rank{r}.pt")["estimates"] for r in range(nproc)]
    return {"model": shared["model"], "ema": shared["ema"], "estimates": estimates, "step": shared["step"]}


def wait_for(proc, condition, what: str) -> None:
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def kill_launching_group(proc, run_dir: Path) -> None:
    """kill -9 of the launcher's process group, as when a terminal or `dvc repro` is killed. torchrun
    starts its workers in sessions of their own, so they must die with it (dddm.distributed)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    workers = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    _, orphans = psutil.wait_procs(workers, timeout=30)
    assert not orphans, f"workers outlived their launcher: {orphans}"


def kill_in_a_checkpoint_write(proc, run_dir: Path, steps_done) -> bool:
    """Stops the launcher and its workers (SIGSTOP) as soon as a new `ckpt-*.tmp` appears, then kills the
    launching group; True when the write was still unfinished when they stopped."""
    before, stale = steps_done(), set(run_dir.glob("ckpt-*.tmp"))
    wait_for(proc, lambda: steps_done() > before, "a step")  # the workers exist
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    wait_for(proc, lambda: set(run_dir.glob("ckpt-*.tmp")) - stale, "a checkpoint write")
    for p in tree:
        p.suspend()
    unfinished = bool(set(run_dir.glob("ckpt-*.tmp")) - stale)
    kill_launching_group(proc, run_dir)
    return unfinished


@pytest.mark.slow
# each store policy once; the spilled (arrow) store with two ranks, each rank's own file killed mid-write
@pytest.mark.parametrize("policy, nproc", [("arrow", 2), ("device", 1)])  # the longer first
def test_kill_9_at_random_steps_and_in_checkpoint_writes_then_resume_is_bit_identical(tmp_path, prepared,
                                                                                      policy, nproc):
    """Three kills per run: at a random step, while a checkpoint directory is being written, at another
    random step; each time the run resumes from its newest checkpoint, and the final weights, EMA
    and every rank's estimates equal an uninterrupted run's bit for bit."""
    def params(name):
        return tiny_params(train={"epochs": 3, "batch_size": 128, "checkpoint_every": 5, "log_every": 4,
                                  "checkpoint_dir": str(tmp_path / name)},
                           model={"dropout": 0.2},  # exercises the restored RNG state
                           method={"udddm": {"store": {"policy": policy}}})

    whole = tmp_path / "whole"
    run_worker(write(whole.mkdir() or whole, params("whole")), prepared, whole / "out", whole / "run", nproc=nproc)
    total = 3 * math.ceil(math.ceil(1797 / nproc) / 128)

    crash = tmp_path / "crash"
    crash.mkdir()
    pfile, run_dir = write(crash, params("crash")), crash / "run"
    history = run_dir / "history.jsonl"
    rng = random.Random(f"{policy}-{nproc}")

    def steps_done() -> int:
        return len(history.read_text().splitlines()) if history.exists() else 0

    def start():
        return run_worker(pfile, prepared, crash / "out", run_dir, nproc, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)

    for moment in ("random step", "checkpoint write", "random step"):
        if moment == "random step":
            proc = start()
            target = rng.randrange(steps_done() + 1, total)
            wait_for(proc, lambda: steps_done() >= target, f"step {target}")
            kill_launching_group(proc, run_dir)
        # a write can end between being seen and the stop; then the kill lands there and the next write is tried
        elif not any(kill_in_a_checkpoint_write(start(), run_dir, steps_done) for _ in range(3)):
            raise AssertionError("three kills all came after the checkpoint write had finished")
    run_worker(pfile, prepared, crash / "out", run_dir, nproc)

    a, b = final_state(whole / "run", whole / "out", nproc), final_state(run_dir, crash / "out", nproc)
    assert a["step"] == b["step"] == total
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for rank in range(nproc):
        assert torch.equal(a["estimates"][rank], b["estimates"][rank]), rank


@pytest.mark.slow
def test_two_gloo_ranks_match_each_other_and_a_single_process(tmp_path, prepared):
    params = tiny_params(train={"epochs": 2, "batch_size": 128, "checkpoint_dir": str(tmp_path / "ck")})
    run_worker(write(tmp_path, params), prepared, tmp_path / "out", tmp_path / "run", nproc=2)
    r0 = torch.load(tmp_path / "out" / "final-rank0.pt")
    r1 = torch.load(tmp_path / "out" / "final-rank1.pt")
    for name in r0["net"]:
        assert torch.equal(r0["net"][name], r1["net"][name]), name

    # The same global batches in one process: DDP averages the two ranks' mean gradients.
    cfg = parse_config(params)
    from dddm.data import PreparedDataset
    data = PreparedDataset(prepared)
    torch.manual_seed(cfg.seed)
    method = cfg.make_method("udddm")
    net = build_network(cfg.model, 8, 1, method.conditioning)
    init = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    from dddm.store import initial_estimates
    estimates = initial_estimates(torch.arange(len(data)), (1, 8, 8), cfg.seed)
    shards = [owned_indices(len(data), r, 2) for r in range(2)]
    steps = -(-len(shards[0]) // cfg.train.batch_size)
    for epoch in range(cfg.train.epochs):
        previous = estimates.clone()  # reads see the estimates as of the epoch start
        per_rank = [epoch_batches(shards[r], cfg.seed, epoch, r, steps) for r in range(2)]
        for k in range(steps):
            opt.zero_grad()
            for r in range(2):
                idx = per_rank[r][k]
                out = method.loss(net, data.images(idx), idx, Progress(epoch, epoch * steps + k, 0), previous[idx])
                (out.total / 2).backward()
                estimates[idx] = out.new_estimates
            opt.step()
    # Adam turns float-rounding noise in near-zero gradients into full-size steps for a few
    # weights, so compare the whole update: DDP's and the reference's must agree to 1%, where
    # different batches would disagree by the order of the update itself.
    ref = torch.cat([p.detach().flatten() for p in net.parameters()])
    ddp = torch.cat([r0["net"][name].flatten() for name, _ in net.named_parameters()])
    assert (ddp - ref).norm() < 0.01 * (ref - init).norm(), ((ddp - ref).norm(), (ref - init).norm())
    both = torch.cat([r0["estimates"], r1["estimates"]])
    order = torch.cat(shards)
    assert torch.allclose(both, estimates[order], atol=1e-4)


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_directory_is_refused_naming_the_first(tmp_path, prepared):
    params = write(tmp_path, tiny_params(train={"epochs": 50, "checkpoint_dir": str(tmp_path / "ck")}))
    first = run_worker(params, prepared, tmp_path / "out", tmp_path / "run", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(first, lambda: (tmp_path / "run" / "history.jsonl").exists(), "the first trainer's first step")
        second = subprocess.run([*torchrun_command(2), str(WORKER), str(params), str(prepared), str(tmp_path / "out2"), str(tmp_path / "run")],
                                env=run_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0
        assert "another trainer is running on this run directory" in second.stderr
        assert f'"pid": {first.pid}, "host": "{socket.gethostname()}"' in second.stderr
        assert first.poll() is None and not (tmp_path / "out2").exists()
    finally:
        kill_launching_group(first, tmp_path / "run")


@pytest.mark.slow
def test_two_clones_sharing_a_store_directory_each_keep_their_own_store_file(tmp_path, prepared):
    """Two clones with the same params (run directories of the same name) and one method.udddm.store.directory
    (shared scratch), training at once: the second once deleted the first's live Arrow file ("no checkpoint of
    this run refers to it")."""
    scratch = tmp_path / "scratch"
    params = write(tmp_path, tiny_params(train={"epochs": 1000, "batch_size": 128},
                                         method={"udddm": {"store": {"policy": "arrow", "directory": str(scratch)}}}))
    runs = [tmp_path / clone / "checkpoints" / "udddm-0123456789abcdef" for clone in ("clone1", "clone2")]
    trainers = []
    try:
        for run_dir in runs:
            trainers.append(run_worker(params, prepared, run_dir.parent / "out", run_dir, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True))
            wait_for(trainers[-1], lambda: (run_dir / "history.jsonl").exists(), f"{run_dir}'s first step")
            if len(trainers) == 1:
                [first] = scratch.glob("*/x0_est-rank0.arrow")
                inode = first.stat().st_ino
        assert len(list(scratch.glob("*/x0_est-rank0.arrow"))) == 2
        assert first.stat().st_ino == inode and trainers[0].poll() is None
    finally:
        for trainer, run_dir in zip(trainers, runs):
            kill_launching_group(trainer, run_dir)


@pytest.mark.parametrize("checkpoint_every, policy", [(3, "device"), (3, "arrow"), (0, "arrow")])
def test_a_nan_loss_inside_a_read_window_stops_naming_its_step_and_the_run_resumes_from_the_checkpoint_before(
        tmp_path, prepared, monkeypatch, checkpoint_every, policy):
    """The loss is read every train.log_every (4) steps, before each checkpoint and at each epoch end (8 steps):
    a NaN at step 5 is found at step 6 (the checkpoint at 6 is never written) or 8, after its update reached
    the weights and the store; the newest checkpoint predates it, and resuming from it (the store's estimates
    of steps after it included) ends where an uninterrupted run ends."""
    cfg = parse_config(tiny_params(train={"epochs": 2, "batch_size": 256, "checkpoint_every": checkpoint_every,
                                          "log_every": 4, "checkpoint_dir": str(tmp_path / "ck")},
                                   method={"udddm": {"store": {"policy": policy}}}))
    whole = result_of(train(cfg, "udddm", prepared, tmp_path / "whole-out", tmp_path / "whole", progress=False))
    from dddm.methods import UDDDM

    real_loss, calls = UDDDM.loss, {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_loss(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(UDDDM, "loss", poisoned)
    run_dir = tmp_path / "run"
    kept = f"the last good checkpoint {run_dir / 'ckpt-000000003'} is kept" if checkpoint_every else \
        "no checkpoint was written yet"
    with pytest.raises(TrainingDiverged, match=f"at step 5 \\(epoch 0\\); {kept}"):
        train(cfg, "udddm", prepared, tmp_path / "out", run_dir, progress=False)
    assert not (tmp_path / "out" / "model.pt").exists()
    history = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3, 4]  # the steps before the bad one
    if checkpoint_every:
        good = checkpoint.latest(run_dir)
        assert good.name == "ckpt-000000003"
        state = torch.load(good / "train_state.pt", weights_only=True)
        assert state["step"] == 3
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    else:
        assert checkpoint.latest(run_dir) is None
    resumed = train(cfg, "udddm", prepared, tmp_path / "out", run_dir, progress=False)  # the poison was once
    assert_identical(result_of(resumed), whole)


def test_the_loss_is_read_once_per_window_and_the_history_keeps_every_step(tmp_path, prepared, monkeypatch):
    """Every 3 steps, and at each epoch end (8 steps): windows of 3, 3, 2, 1, 3, 3, 1 steps over 2 epochs."""
    import dddm.training

    windows, real = [], dddm.training.read_stats
    monkeypatch.setattr(dddm.training, "read_stats", lambda window: windows.append(len(window)) or real(window))
    cfg = parse_config(tiny_params(train={"epochs": 2, "batch_size": 256, "log_every": 3,
                                          "checkpoint_dir": str(tmp_path / "ck")}))
    result = train(cfg, "udddm", prepared, tmp_path / "out", tmp_path / "run", progress=False)
    assert windows == [3, 3, 2, 1, 3, 3, 1]
    rows = [json.loads(line) for line in result.history_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert all(tuple(r) == history_fields(cfg.make_method("udddm").terms) for r in rows)
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in rows)


def test_loss_tsv_is_the_same_file_whatever_the_wall_times(tmp_path):
    """loss.tsv is a committed output: it keeps the history's reproducible columns, not its seconds."""
    terms = ("guide",)
    tsvs = []
    for seconds in (0.5, 2.0):
        history = tmp_path / f"history{seconds}.jsonl"
        history.write_text(json.dumps({k: seconds if k == "img_per_s" or k.startswith("time_") else 1.0
                                       for k in history_fields(terms)}) + "\n")
        write_history(history, tmp_path / f"loss{seconds}.tsv", terms)
        tsvs.append((tmp_path / f"loss{seconds}.tsv").read_text())
    assert tsvs[0] == tsvs[1] and tsvs[0].splitlines()[0] == "step\tepoch\tloss\tguide\tlr\tstore_bytes"


def nearest_data_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Mean over samples of the RMS pixel distance to the nearest training image."""
    return torch.cdist(samples.flatten(1), data.flatten(1)).min(dim=1).values.mean().item() / samples[0].numel() ** 0.5


@pytest.mark.parametrize("name", ["udddm", "ict", "edm"])
def test_a_short_training_run_beats_the_untrained_network(tmp_path, prepared, name):
    """Each method's samples after a short run lie nearer the data than the untrained network's."""
    from dddm.checkpoint import load_model
    from dddm.data import PreparedDataset
    from dddm.sampling import sample

    cfg = parse_config(tiny_params(train={"epochs": 4, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.9,
                                          "checkpoint_dir": str(tmp_path / "ck")}))
    train(cfg, name, prepared, tmp_path / "out", tmp_path / "run", progress=False)
    trained = load_model(tmp_path / "out" / "model.pt")
    assert trained.method.name == name
    data = PreparedDataset(prepared).images(range(1797))
    steps = max(trained.method.sampler.steps)
    after = sample(trained.method, trained.net, 64, trained.shape, steps, batch_size=64)
    before = sample(trained.method, trained.untrained(), 64, trained.shape, steps, batch_size=64)
    assert nearest_data_distance(after, data) < 0.8 * nearest_data_distance(before, data)
