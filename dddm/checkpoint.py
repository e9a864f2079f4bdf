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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed
from .config import parse_config
from .unet import build_network

_NAME = re.compile(r"^ckpt-(\d{9})$")


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    atomic_save({"world_size": world.world_size, "rng": _rng_state(),
                 "store": store.state_dict() if store is not None else None},
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
    if store is not None:
        store.load_state_dict(own["store"])
    torch.set_rng_state(own["rng"]["torch"])
    if "cuda" in own["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["rng"]["cuda"])
    return int(shared["step"])


def save_model(path: Path, cfg, method: str, info, module: torch.nn.Module) -> None:
    """The final EMA network with the params, method and dataset info needed to rebuild it."""
    atomic_save({"params": cfg.model_dump(mode="json"), "method": method, "dataset": asdict(info),
                 "state_dict": module.state_dict()}, path)


@dataclass
class TrainedModel:
    net: torch.nn.Module  # in eval mode
    cfg: object           # the Config it was trained with
    method: object        # its dddm.methods.Method
    dataset: dict         # the prepared dataset's info

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dataset["channels"], self.dataset["image_size"], self.dataset["image_size"])

    def with_sampler(self, cfg):
        """The model's method (its training params) with the sampling params and seed of `cfg`, the
        current params: sampling settings change without retraining."""
        return self.cfg.make_method(self.method.name, getattr(cfg.sampler, self.method.name), cfg.seed)

    def untrained(self) -> torch.nn.Module:
        """The same network as initialised by the train stage (the floor any training must beat)."""
        torch.manual_seed(self.cfg.seed)
        return build_network(self.cfg.model, self.dataset["image_size"], self.dataset["channels"],
                             self.method.conditioning).to(next(self.net.parameters()).device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu", expect_method: str | None = None) -> TrainedModel:
    """The network, its params and method from a file written by save_model."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found (run the train stage first)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = parse_config(blob["params"], str(path))
    method = cfg.make_method(blob["method"])
    if expect_method is not None and method.name != expect_method:
        raise ValueError(f"{path}: holds a {method.name} model, not {expect_method}")
    net = build_network(cfg.model, blob["dataset"]["image_size"], blob["dataset"]["channels"], method.conditioning)
    net.load_state_dict(blob["state_dict"])
    return TrainedModel(net.to(device).eval(), cfg, method, blob["dataset"])
