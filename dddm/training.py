"""The training loop: data shards, the x0 store, DDP, EMA, checkpoints, progress.

Per epoch n, each rank walks its own fixed shard of dataset indices (the same indices its
store owns) in an order drawn from (seed, n, rank); per batch it gathers the previous
estimates, runs `training_step`, steps the optimizer, updates the EMA and scatters the
new estimates. Everything random is keyed by (seed, epoch, index) or saved in the
checkpoint, so a resumed run continues exactly where the interrupted one stood.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import checkpoint, distributed, runlock
from .config import Config
from .data import PreparedDataset
from .losses import metric_fn
from .rng import STREAM_EPOCH_ORDER, generator
from .step import training_step
from .store import open_store, owned_indices, store_path

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the checkpoints are left as they were."""


def build_network(cfg: Config, channels: int) -> torch.nn.Module:
    from .unet import UNet

    m = cfg.model
    return UNet(image_size=cfg.data.image_size, channels=channels, base_channels=m.base_channels,
                channel_mult=m.channel_mult, num_blocks=m.num_blocks, attn_resolutions=m.attn_resolutions,
                dropout=m.dropout, num_heads=m.num_heads, conditioning=m.conditioning)


def epoch_batches(owned: torch.Tensor, seed: int, epoch: int, rank: int, num_batches: int) -> list[torch.Tensor]:
    """This rank's shard in a fresh order each epoch, split into exactly `num_batches` near-equal batches
    (every rank runs the same number of steps, as DDP requires, and visits each sample once)."""
    order = owned[torch.randperm(len(owned), generator=generator(seed, STREAM_EPOCH_ORDER, epoch, rank))]
    return list(torch.tensor_split(order, num_batches))


@dataclass
class TrainResult:
    model_path: Path
    global_step: int
    history_path: Path  # one JSON row per step, the whole run's (resumes included)
    net: torch.nn.Module  # this rank's trained network (not the EMA)
    ema: AveragedModel
    store: object  # this rank's x0 store (dddm.store.EstimateStore)


PHASES = ("data", "store", "forward", "backward", "optimizer")
HISTORY_FIELDS = ("step", "epoch", "loss", "guide", "iterative", "weight", "lr", "img_per_s", "store_bytes",
                  *(f"time_{p}" for p in PHASES))


def run_directory(cfg: Config, fingerprint: str) -> Path:
    """<train.checkpoint_dir>/<hash>: one directory per training configuration and dataset, so
    `resume: auto` never continues a run of other parameters."""
    identity = cfg.model_dump(mode="json", include={"seed", "data", "model", "diffusion", "loss", "train", "store"})
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in ("resume", "device", "keep_checkpoints")}
    digest = hashlib.sha256(json.dumps([identity, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.train.checkpoint_dir) / digest


def _truncate_history(path: Path, last_step: int) -> None:
    """Drop rows a crashed run logged after the checkpoint it is resumed from, and a last line torn
    by a kill while it was being written."""
    if path.exists():
        lines = path.read_text().splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    log.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                    break
                raise RuntimeError(f"{path}: line {number} is not JSON; delete the file to start its history "
                                   f"afresh") from None
            if row["step"] <= last_step:
                rows.append(line)
        path.write_text("".join(r + "\n" for r in rows))


def write_history(history_path: Path, tsv_path: Path) -> None:
    """The per-step history as a TSV that `dvc plots` renders."""
    tsv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tsv_path, "w") as out:
        out.write("\t".join(HISTORY_FIELDS) + "\n")
        for line in history_path.read_text().splitlines():
            row = json.loads(line)
            out.write("\t".join(str(row[k]) for k in HISTORY_FIELDS) + "\n")


class NullTracker:
    """What the loop reports to; the MLflow tracker (rank 0) implements the same methods."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def on_epoch_end(self, epoch: int, ema_model: torch.nn.Module) -> None: ...


def train(cfg: Config, prepared_path: str | Path, out_dir: str | Path, run_dir: str | Path,
          tracker=None, progress: bool = True) -> TrainResult:
    """Train per `cfg` on the prepared dataset; write the final EMA model to out_dir/model.pt.
    `run_dir` holds checkpoints and the x0 store; with train.resume = auto the newest checkpoint
    there that verifies is continued. One trainer per run_dir: a second one raises RunLocked."""
    world = distributed.init(cfg.train.device)
    with runlock.hold(Path(run_dir), world):
        return _train(cfg, prepared_path, out_dir, run_dir, tracker, progress)


def _train(cfg: Config, prepared_path: str | Path, out_dir: str | Path, run_dir: str | Path,
           tracker, progress: bool) -> TrainResult:
    world = distributed.init(cfg.train.device)
    tracker = tracker if (tracker is not None and world.is_main) else NullTracker()
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    dataset = PreparedDataset(prepared_path)
    info = dataset.info
    shape = (info.channels, info.image_size, info.image_size)
    tc = cfg.train

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    net = build_network(cfg, info.channels).to(world.device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / tc.warmup_steps)
                                              if tc.warmup_steps else 1.0)
    model = DistributedDataParallel(net, device_ids=[world.device.index] if world.device.type == "cuda" else None) \
        if world.world_size > 1 else net

    owned = owned_indices(info.num_samples, world.rank, world.world_size)
    largest_shard = math.ceil(info.num_samples / world.world_size)
    steps_per_epoch = math.ceil(largest_shard / tc.batch_size)
    diffusion = cfg.make_diffusion()
    metric = metric_fn(cfg.loss.metric, cfg.huber_c)

    # Rank 0 verifies the checkpoints; every rank resumes from the one it chose.
    latest = distributed.all_gather_objects(checkpoint.resumable(run_dir, steps_per_epoch)
                                            if tc.resume == "auto" and world.is_main else None)[0]
    store_dir = Path(cfg.store.directory) / run_dir.name if cfg.store.directory else run_dir / "store"
    stale = store_path(store_dir, world.rank)
    if latest is None and stale.exists():
        # No checkpoint refers to these estimates (a run that died before its first checkpoint,
        # or resume: never), so they cannot be continued consistently: start afresh, said aloud.
        log.warning("removing %s: no checkpoint of this run refers to it", stale)
        stale.unlink()
    store = open_store(cfg.store.policy, store_dir, info.num_samples, shape, cfg.store.dtype,
                       cfg.seed, info.fingerprint, world.device, world.rank, world.world_size,
                       cfg.store.budget_fraction, resume=latest is not None)
    global_step = 0
    history_path = run_dir / "history.jsonl"
    if latest is not None:
        global_step = checkpoint.restore(latest, world, net=net, ema=ema, opt=opt, sched=sched, store=store)
        log.info("resumed from %s at step %d", latest, global_step)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if latest is None:
            history_path.unlink(missing_ok=True)
        _truncate_history(history_path, global_step)
    if world.is_main:
        log.info("world size %d, per-rank batch %d, global batch %d, %d steps per epoch, store %s (%s)",
                 world.world_size, tc.batch_size, tc.batch_size * world.world_size, steps_per_epoch,
                 type(store).__name__, cfg.store.dtype)
    tracker.set_tags({"world_size": str(world.world_size), "device": str(world.device),
                      "store_backend": type(store).__name__, "global_batch": str(tc.batch_size * world.world_size)})

    total_steps = tc.epochs * steps_per_epoch
    saved = latest  # the newest checkpoint this run can go back to
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=tc.bf16 and world.device.type == "cuda")
    bar = tqdm(total=total_steps, initial=global_step, desc="train", disable=not (progress and world.is_main))
    net.train()
    while global_step < total_steps:
        epoch, position = divmod(global_step, steps_per_epoch)
        store.begin_epoch(epoch)
        batches = epoch_batches(owned, cfg.seed, epoch, world.rank, steps_per_epoch)
        for idx in batches[position:]:
            times = dict.fromkeys(PHASES, 0.0)
            t0 = mark = time.perf_counter()

            def lap(phase: str) -> None:  # host wall time per phase (on CUDA: launch + sync points)
                nonlocal mark
                now = time.perf_counter()
                times[phase] += now - mark
                mark = now

            x0 = dataset.images(idx).to(world.device, non_blocking=True)
            lap("data")
            est = store.gather(idx)
            lap("store")
            with autocast:
                out = training_step(model, diffusion, x0, idx, est, epoch, metric, cfg.seed)
            # One small all-reduce gives every rank the same numbers, so all stop together on NaN,
            # before a bad step touches the weights or the store.
            stats = torch.stack([out.terms.total.detach().float(), out.terms.guide.detach().float(),
                                 out.terms.iterative.detach().float(),
                                 torch.tensor(float(len(idx)), device=world.device)])
            stats = distributed.all_reduce_sum(stats)
            loss, guide, iterative = (stats[:3] / world.world_size).tolist()
            if not math.isfinite(loss):
                kept = f"the last good checkpoint {saved} is kept" if saved else \
                    f"no checkpoint was written yet (train.checkpoint_every: {tc.checkpoint_every})"
                raise TrainingDiverged(f"non-finite loss ({loss}) at step {global_step + 1} (epoch {epoch}); {kept}")
            lap("forward")
            opt.zero_grad(set_to_none=True)
            out.terms.total.backward()
            lap("backward")
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            ema.update_parameters(net)
            lap("optimizer")
            store.scatter(idx, out.new_estimates)
            lap("store")
            global_step += 1
            row = {"step": global_step, "epoch": epoch, "loss": loss, "guide": guide, "iterative": iterative,
                   "weight": out.terms.weight, "lr": sched.get_last_lr()[0],
                   "img_per_s": stats[3].item() / (mark - t0), "store_bytes": store.nbytes,
                   **{f"time_{k}": v for k, v in times.items()}}
            if world.is_main:
                with open(history_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, global_step)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{row['img_per_s']:.0f}")
            end_of_epoch = global_step % steps_per_epoch == 0
            if (tc.checkpoint_every and global_step % tc.checkpoint_every == 0) or \
                    (end_of_epoch and store.needs_epoch_checkpoint) or global_step == total_steps:
                saved = checkpoint.save(run_dir, global_step, world, net=net, ema=ema, opt=opt, sched=sched,
                                        store=store, keep=tc.keep_checkpoints)
        tracker.on_epoch_end(epoch, ema.module)
    bar.close()

    model_path = out_dir / "model.pt"
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save_model(model_path, cfg, info, ema.module)
        lines = history_path.read_text().splitlines() if history_path.exists() else []
        last = json.loads(lines[-1]) if lines else {}  # also after a resume from the final checkpoint
        summary = {k: last[k] for k in ("loss", "guide", "iterative", "weight") if k in last}
        (out_dir / "train_metrics.json").write_text(json.dumps(summary | {"steps": global_step}, indent=2))
    distributed.barrier()
    return TrainResult(model_path=model_path, global_step=global_step, history_path=history_path, net=net, ema=ema, store=store)
