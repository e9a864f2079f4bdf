"""Checkpoints that survive a crash, and the final model file.

A checkpoint is a directory `ckpt-<step>` holding the shared training state (rank 0) and one
file per rank (its RNG states and its store state). It is written as `ckpt-<step>.tmp` and
renamed when every rank has finished, so a crash while writing leaves the previous
checkpoint as the latest complete one. Older checkpoints are removed only after the rename.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from . import distributed
from .files import atomic_open

_NAME = re.compile(r"^ckpt-(\d{9})$")


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically (`dddm.files.atomic_open`)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory in run_dir, or None."""
    if not run_dir.is_dir():
        return None
    done = sorted(p for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name))
    return done[-1] if done else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(run_dir: Path, step: int, world, *, net, ema, opt, sched, store) -> Path:
    final = run_dir / f"ckpt-{step:09d}"
    tmp = run_dir / f"ckpt-{step:09d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    atomic_save({"world_size": world.world_size, "rng": _rng_state(), "store": store.state_dict()},
                tmp / f"rank{world.rank}.pt")
    if world.is_main:
        atomic_save({"step": step, "world_size": world.world_size, "model": net.state_dict(),
                     "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                    tmp / "train_state.pt")
    distributed.barrier()
    if world.is_main:
        if final.exists():  # a resumed run re-reaching a step it had saved before
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in run_dir.iterdir():
            if old != final and old.is_dir() and (_NAME.match(old.name) or old.name.endswith(".tmp")):
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def restore(path: Path, world, *, net, ema, opt, sched, store) -> int:
    """Load a checkpoint into the given objects; returns its global step."""
    shared = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    if shared["world_size"] != world.world_size:
        raise RuntimeError(f"{path}: written by {shared['world_size']} process(es) but this run has "
                           f"{world.world_size}; resume with the same train.nproc or start a new run")
    own = torch.load(path / f"rank{world.rank}.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(shared["model"])
    ema.load_state_dict(shared["ema"])
    opt.load_state_dict(shared["optimizer"])
    sched.load_state_dict(shared["scheduler"])
    store.load_state_dict(own["store"])
    torch.set_rng_state(own["rng"]["torch"])
    if "cuda" in own["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["rng"]["cuda"])
    return int(shared["step"])


def save_model(path: Path, cfg, info, module: torch.nn.Module) -> None:
    """The final EMA network with the params and dataset info needed to rebuild it."""
    atomic_save({"params": cfg.model_dump(mode="json"), "dataset": asdict(info),
                 "state_dict": module.state_dict()}, path)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(network in eval mode, Config, dataset info dict) from a file written by save_model."""
    from .config import parse_config
    from .training import build_network

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found (run the train stage first)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = parse_config(blob["params"], str(path))
    net = build_network(cfg, blob["dataset"]["channels"])
    net.load_state_dict(blob["state_dict"])
    return net.to(device).eval(), cfg, blob["dataset"]
