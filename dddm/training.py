"""The training loop of every method: data shards, the x0 store, DDP, EMA, checkpoints, progress.

Per epoch n, each rank walks its own fixed shard of dataset indices (the same indices its
store owns) in an order drawn from (seed, n, rank); per batch it gathers the previous
estimates (methods with a store), computes the method's loss, steps the optimizer, updates the
EMA and scatters the new estimates. Everything random is keyed by (seed, epoch, index) or saved
in the checkpoint, so a resumed run continues exactly where the interrupted one stood.
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

from . import checkpoint, distributed, performance, runlock
from .checkpoint import TrainedModel
from .config import Config
from .curves import LearningCurve
from .data import PreparedDataset
from .finetune import Initialisation, describe_teacher, initialise
from .methods import Progress
from .progress import progress as progress_bar
from .rng import STREAM_EPOCH_ORDER, generator
from .store import open_store, owned_indices, remove_unused, store_path
from .unet import build_network

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the checkpoints are left as they were."""


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
    store: object | None  # this rank's x0 store (dddm.store.EstimateStore), for methods that keep one


PHASES = ("data", "store", "forward", "backward", "optimizer")


def history_fields(terms: tuple[str, ...]) -> tuple[str, ...]:
    """The columns of history.jsonl / loss.tsv for a method logging `terms`."""
    return ("step", "epoch", "loss", *terms, "lr", "img_per_s", "store_bytes", *(f"time_{p}" for p in PHASES))


def images_behind(init: Initialisation | None, teacher: TrainedModel | None) -> int:
    """The training images behind a run's start: its initialisation's and its teacher's (once where the teacher is
    the model it starts from)."""
    images = init.images if init is not None else 0
    if teacher is not None and (init is None or teacher.weights_sha256 != init.weights_sha256):
        images += teacher.images
    return images


def run_directory(cfg: Config, method: str, fingerprint: str, init: Initialisation | None = None,
                  teacher: TrainedModel | None = None) -> Path:
    """<train.checkpoint_dir>/<method>-<hash>: one directory per method, training configuration, dataset
    initialisation (the weights it starts from) and teacher, so `resume: auto` never continues a run of other
    parameters. The world size and the threads per process count, not how the world is split into nodes and
    processes: 2 nodes x 4 continue what 1 x 8 began (the same ranks, batches and sums)."""
    identity = checkpoint.training_identity(cfg, method)
    for key in ("nproc", "nnodes"):
        identity["train"].pop(key)
    identity["train"]["world_size"] = cfg.train.world_size
    identity["train"]["threads"] = torch.get_num_threads()  # what this process sums with, not the setting
    if init is not None:
        identity["finetune"]["init_weights_sha256"] = init.weights_sha256
    if teacher is not None:
        identity["finetune"]["teacher_weights_sha256"] = teacher.weights_sha256
    digest = hashlib.sha256(json.dumps([identity, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.train.checkpoint_dir) / f"{method}-{digest}"


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


def write_history(history_path: Path, tsv_path: Path, terms: tuple[str, ...]) -> None:
    """The per-step history as a TSV that `dvc plots` renders, without the wall times (throughput and phase
    seconds: in history.jsonl and MLflow), which differ on every run: a rerun writes the same file."""
    fields = tuple(f for f in history_fields(terms) if f != "img_per_s" and not f.startswith("time_"))
    tsv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tsv_path, "w") as out:
        out.write("\t".join(fields) + "\n")
        for line in history_path.read_text().splitlines():
            row = json.loads(line)
            out.write("\t".join(str(row[k]) for k in fields) + "\n")


def read_stats(window: list[torch.Tensor]) -> list[list[float]]:
    """Each step's stats in `window`, summed over the ranks, on the host: the training loop's one
    all-reduce and one wait for the device per train.log_every steps."""
    return distributed.all_reduce_sum(torch.stack(window)).tolist()


def curve_metrics(point: dict) -> dict:
    """A learning-curve point as MLflow metrics (`curve/fid_classifier_1step`, ...) at its training step."""
    return {f"curve/{k}": v for k, v in point.items() if k != "epoch"}


class NullTracker:
    """What the loop reports to; the MLflow tracker (rank 0) implements the same methods."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def on_epoch_end(self, epoch: int, ema_model: torch.nn.Module) -> None: ...


def train(cfg: Config, method_name: str, prepared_path: str | Path, out_dir: str | Path, run_dir: str | Path,
          tracker=None, progress: bool = True, init: Initialisation | None = None,
          curve: LearningCurve | None = None, teacher: TrainedModel | None = None) -> TrainResult:
    """Train `method_name` per `cfg` on the prepared dataset, from scratch or from `init` (a fine-tuned
    method), learning from `teacher` for a method that distills; write the final EMA model to out_dir/model.pt.
    `run_dir` holds checkpoints and the x0 store; with train.resume = auto the newest checkpoint there that
    verifies is continued. `curve` (rank 0's) records a learning-curve point every train.eval_every epochs and
    at the end. One trainer per run_dir: a second one raises RunLocked."""
    world = distributed.init(cfg.train.device, cfg.rendezvous.timeout)
    with runlock.hold(Path(run_dir), world):
        return _train(cfg, world, method_name, prepared_path, out_dir, run_dir, tracker, progress, init, curve,
                      teacher)


def _train(cfg: Config, world, method_name: str, prepared_path: str | Path, out_dir: str | Path,
           run_dir: str | Path, tracker, progress: bool, init: Initialisation | None,
           curve: LearningCurve | None, teacher: TrainedModel | None) -> TrainResult:
    tracker = tracker if (tracker is not None and world.is_main) else NullTracker()
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    dataset = PreparedDataset(prepared_path)
    info = dataset.info
    shape = (info.channels, info.image_size, info.image_size)
    tc = cfg.train

    method = cfg.make_method(method_name)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    net = build_network(cfg.network_of(method_name), info.image_size, info.channels, method.conditioning)
    if init is not None:
        initialise(net, init)
    net = net.to(world.device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    if teacher is not None:
        teacher.net.to(world.device)
    method.begin_training(net, teacher)
    opt = method.make_optimizer(net.parameters(), cfg.lr_of(method_name), world.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / tc.warmup_steps)
                                              if tc.warmup_steps else 1.0)
    model = DistributedDataParallel(net, device_ids=[world.device.index] if world.device.type == "cuda" else None) \
        if world.world_size > 1 else net
    model = performance.maybe_compile(model, tc.compile)

    owned = owned_indices(info.num_samples, world.rank, world.world_size)
    largest_shard = math.ceil(info.num_samples / world.world_size)
    steps_per_epoch = math.ceil(largest_shard / tc.batch_size)
    # the largest of epoch_batches' batches: the shard itself when train.batch_size exceeds it
    batch = math.ceil(largest_shard / steps_per_epoch)
    # Rank 0 verifies the checkpoints; every rank resumes from the one it chose.
    latest = distributed.all_gather_objects(checkpoint.resumable(run_dir, steps_per_epoch)
                                            if tc.resume == "auto" and world.is_main else None)[0]
    store = _open_store(method, run_dir, latest is not None, info, shape, cfg.seed, world) if method.uses_store else None
    global_step = 0
    history_path = run_dir / "history.jsonl"
    total_steps = cfg.epochs_of(method_name) * steps_per_epoch
    if latest is not None:
        global_step = checkpoint.restore(latest, world, net=net, ema=ema, opt=opt, sched=sched, store=store,
                                         method=method)
        if global_step < total_steps:
            log.info("resumed from %s at step %d", latest, global_step)
        elif world.is_main:
            log.warning("%s: this configuration was trained to the end before (%s, step %d of %d); nothing is trained, "
                        "its model is written again. To train it again from step 0, delete %s or set train.resume: never",
                        method.name, latest, global_step, total_steps, run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if latest is None:
            history_path.unlink(missing_ok=True)
        _truncate_history(history_path, global_step)
    if world.is_main:
        log.info("%s: world size %d, per-rank batch %d (train.batch_size %d, shard %d), global batch %d, %d steps "
                 "per epoch, store %s", method.name, world.world_size, batch, tc.batch_size, largest_shard,
                 batch * world.world_size, steps_per_epoch, store.describe() if store is not None else "none")
    tracker.set_tags({"world_size": str(world.world_size), "device": str(world.device),
                      "store_backend": type(store).__name__ if store is not None else "none",
                      "global_batch": str(batch * world.world_size)})

    images_before = images_behind(init, teacher)
    curve = curve if world.is_main else None
    if curve is not None:
        curve.prepare(dataset.stored_images, info.fingerprint, global_step // steps_per_epoch)
        if init is not None and global_step == 0:
            tracker.log_metrics(curve_metrics(curve.record(ema.module, 0, images_before)), 0)
    saved = latest  # the newest checkpoint this run can go back to
    autocast = performance.bf16_autocast(world.device, tc.bf16, tc.cpu_bf16)
    bar = progress_bar(total_steps, f"train {method.name}", initial=global_step, unit="step",
                       disable=not (progress and world.is_main))
    window: list[tuple[torch.Tensor, dict]] = []  # the steps not yet read: (stats on the device, host-side figures)

    def read_window() -> None:
        """Check and log the window's steps. A non-finite loss stops every rank (they read the same sums)
        naming its step; its weights and store estimates may have been written, but no checkpoint holds
        them: checkpoints are saved only after a read."""
        start = time.perf_counter()
        sums = read_stats([stats for stats, _ in window])
        window[-1][1]["seconds"] += time.perf_counter() - start  # the wait for the device, on the step that waited
        rows = []
        for (_, host), (*means, images) in zip(window, sums):
            loss, *terms = (v / world.world_size for v in means)
            if not math.isfinite(loss):
                break
            rows.append({"step": host["step"], "epoch": host["epoch"], "loss": loss, **dict(zip(method.terms, terms)),
                         "lr": host["lr"], "img_per_s": images / host["seconds"], "store_bytes": host["store_bytes"],
                         **{f"time_{k}": v for k, v in host["times"].items()}})
        if world.is_main:
            with open(history_path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        for row in rows:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
        if len(rows) < len(window):
            bad = window[len(rows)][1]
            kept = f"the last good checkpoint {saved} is kept" if saved else \
                f"no checkpoint was written yet (train.checkpoint_every: {tc.checkpoint_every})"
            raise TrainingDiverged(f"non-finite loss ({loss}) at step {bad['step']} (epoch {bad['epoch']}); {kept}")
        last = rows[-1]
        bar.set_postfix(epoch=f"{last['epoch'] + 1}/{total_steps // steps_per_epoch}", loss=f"{last['loss']:.4f}",
                        img_s=f"{last['img_per_s']:.0f}")
        window.clear()

    net.train()
    while global_step < total_steps:
        epoch, position = divmod(global_step, steps_per_epoch)
        if store is not None:
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
            est = store.gather(idx) if store is not None else None
            lap("store")
            with autocast:
                out = method.loss(model, x0, idx, Progress(epoch, global_step, total_steps), est)
            # kept on the device until the next read; host numbers by a fill, as a copy would wait for the device
            stats = torch.stack([v.detach().to(world.device, torch.float32) if torch.is_tensor(v)
                                 else torch.full((), float(v), device=world.device)
                                 for v in (out.total, *(out.terms[k] for k in method.terms), len(idx))])
            lap("forward")
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            lap("backward")
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            ema.update_parameters(net)
            method.end_step(net)
            lap("optimizer")
            if store is not None:
                store.scatter(idx, out.new_estimates)
            lap("store")
            global_step += 1
            window.append((stats, {"step": global_step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                                   "seconds": mark - t0, "store_bytes": store.nbytes if store is not None else 0,
                                   "times": times}))
            bar.update(1)
            end_of_epoch = global_step % steps_per_epoch == 0
            save = (tc.checkpoint_every and global_step % tc.checkpoint_every == 0) or \
                (end_of_epoch and store is not None and store.needs_epoch_checkpoint) or global_step == total_steps
            # Every epoch end too: a window never spans one, so no estimate a bad step scattered is gathered
            # (each sample is gathered once per epoch, before its scatter) before the read stops the run.
            if save or end_of_epoch or global_step % tc.log_every == 0:
                read_window()
            if save:
                saved = checkpoint.save(run_dir, global_step, world, net=net, ema=ema, opt=opt, sched=sched,
                                        store=store, method=method, keep=tc.keep_checkpoints)
        tracker.on_epoch_end(epoch, ema.module)
        done = epoch + 1
        if curve is not None and tc.eval_every and (done % tc.eval_every == 0 or global_step == total_steps):
            tracker.log_metrics(curve_metrics(curve.record(ema.module, done, images_before + done * info.num_samples)),
                                global_step)
    bar.close()

    model_path = out_dir / "model.pt"
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save_model(model_path, cfg, method.name, info, ema.module,
                              images=images_before + cfg.epochs_of(method_name) * info.num_samples,
                              init=None if init is None else
                              init.describe() | ({"teacher": describe_teacher(cfg, teacher)} if teacher else {}))
        lines = history_path.read_text().splitlines() if history_path.exists() else []
        last = json.loads(lines[-1]) if lines else {}  # also after a resume from the final checkpoint
        # the final loss is the stage's metric (`dvc metrics show`); the last step's loss terms and schedule
        # values and the step count are information beside it, not metrics
        (out_dir / "train_metrics.json").write_text(json.dumps({k: last[k] for k in ("loss",) if k in last}, indent=2))
        info = {k: last[k] for k in method.terms if k in last} | {"steps": global_step}
        (out_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    distributed.barrier()
    return TrainResult(model_path=model_path, global_step=global_step, history_path=history_path, net=net, ema=ema, store=store)


def _open_store(method, run_dir: Path, resuming: bool, info, shape, seed: int, world):
    """This rank's x0 store, in the run directory unless the method's `store.directory` says otherwise: there, in a
    subdirectory of this run directory's own (its name and its absolute path's hash), since two clones with the
    same params have run directories of the same name and may share that directory (node-local scratch)."""
    sc = method.cfg.store
    if sc.directory:
        where = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
        store_dir = Path(sc.directory) / f"{run_dir.name}-{where}"
    else:
        store_dir = run_dir / "store"
    stale = store_path(store_dir, world.rank)
    if not resuming and stale.exists():
        # No checkpoint refers to these estimates (a run that died before its first checkpoint,
        # or resume: never), so they cannot be continued consistently: start afresh, said aloud.
        remove_unused(stale)
        log.warning("removed %s: no checkpoint of this run refers to it", stale)
    return open_store(sc.policy, store_dir, info.num_samples, shape, sc.dtype, seed, info.fingerprint,
                      world.device, world.rank, world.world_size, sc.budget_fraction, resume=resuming)
