"""What params.yaml asks of this machine, estimated by the check stage before any stage runs: memory
per training process, disk for checkpoints, the x0 store and the samples, time for training and
sampling. A request beyond the machine is refused naming the key (`limits` in params.yaml raises the
time allowed or, for a bigger machine than the one checking, turns the estimates off).

The estimates are deliberately rough (a factor of two either way): they stop what cannot finish
(10^12 epochs, 10^9 samples, a 10^5-channel network), not what is merely slow. Nothing here
allocates what it estimates: the network is built on torch's `meta` device to count its
parameters and floating-point operations, and time is those operations at this device's measured
matrix-product rate.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .store.common import fmt_bytes
from .unet import build_network

# Images per source where the format fixes them; `folder` is counted, a remote folder is unknown.
KNOWN_SIZES = {"digits": 1797, "cifar10": 50000, "imagenet64": 1281167}
CHANNELS = {"digits": 1}  # every other source is RGB
PROCESS_OVERHEAD = 500 * 2**20  # a trainer's Python + torch before any tensor (the workers: 470 MB)
TRAINING_COPIES = 5  # weights, gradients, Adam's two moments, EMA
ACTIVATION_FACTOR = 24  # float32 values kept for backward per feature-map element (norm, conv, SiLU, ...)
PROBE_BATCH = 2


def fmt_hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.3g} h" if hours < 24 * 365 else f"{hours / (24 * 365):.3g} years"


@dataclass(frozen=True)
class Machine:
    cpus: int
    memory: int  # available RAM, bytes
    device: torch.device
    device_memory: int | None  # free GPU memory of one device, bytes
    flop_rate: float  # float32 operations per second (flop_rate)

    @classmethod
    def here(cls, device: torch.device) -> Machine:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        return cls(os.cpu_count() or 1, psutil.virtual_memory().available, device, free, flop_rate(device))


def dataset_size(cfg) -> int | None:
    """How many images the prepare stage will write, where it can be known before it runs."""
    if cfg.data.source in KNOWN_SIZES:
        return KNOWN_SIZES[cfg.data.source]
    path = Path(cfg.data.path or "")
    if cfg.data.source == "folder" and "://" not in str(cfg.data.path) and path.is_dir():
        from .data import IMAGE_EXTENSIONS
        return sum(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(path) for name in names)
    return None


def _network(cfg, method: str, device: torch.device | str):
    return build_network(cfg.model, cfg.data.image_size, CHANNELS.get(cfg.data.source, 3),
                         cfg.make_method(method).conditioning).to(device)


def parameter_count(cfg, method: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _network(cfg, method, "meta").parameters())


def activation_bytes_per_image(cfg) -> int:
    """Feature maps kept for backward, per image: every level's channels x pixels, down and up paths."""
    m, size = cfg.model, cfg.data.image_size
    elements = sum(m.base_channels * mult * (size // 2**level) ** 2
                   for level, mult in enumerate(m.channel_mult)) * (m.num_blocks + 1) * 2
    return 4 * ACTIVATION_FACTOR * elements


def flops_per_image(cfg, method: str) -> tuple[float, float]:
    """(training step, forward pass) floating-point operations per image, counted by torch on the
    `meta` device: nothing is computed or allocated."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = _network(cfg, method, "meta").train()
        shape = (PROBE_BATCH, net.channels, net.image_size, net.image_size)
        x0 = None if net.conditioning == "none" else torch.zeros(shape)
        x, label = torch.zeros(shape), torch.zeros(PROBE_BATCH)
        with FlopCounterMode(display=False) as counter:
            out = net(x0, x, label)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().mean().backward()
    return (forward + counter.get_total_flops()) / PROBE_BATCH, forward / PROBE_BATCH


def flop_rate(device: torch.device) -> float:
    """Floating-point operations per second of a 512 x 512 float32 matrix product on `device` with this
    process's threads (0.2 s): an upper bound of what a convolutional network reaches, so the time
    estimates err short (measured: the default uDDDM trains in 2 min 20 s, estimated 6 min here)."""
    a = torch.randn(512, 512, device=device)
    for _ in range(2):
        a @ a
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ a
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return count * 2 * 512**3 / (time.perf_counter() - start)


def _free_disk(path: Path) -> tuple[int, int]:
    """(free bytes, device id) of the file system that holds `path` or would hold it."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free, path.stat().st_dev


def machine_problems(cfg, machine: Machine) -> list[str]:
    """Each estimate beyond `machine`, naming the key to change."""
    tc, problems = cfg.train, []
    n = dataset_size(cfg)
    image_bytes = CHANNELS.get(cfg.data.source, 3) * cfg.data.image_size ** 2
    limit = cfg.limits.max_hours * 3600
    disk: dict[int, list] = {}  # file system -> [free, bytes needed, keys, where]

    def need(path: Path, nbytes: float, key: str) -> None:
        free, dev = _free_disk(Path(path).absolute())
        entry = disk.setdefault(dev, [free, 0.0, {}, Path(path)])
        entry[1] += nbytes
        entry[2][key] = entry[2].get(key, 0) + nbytes

    counted: dict[str, tuple] = {}  # methods whose networks take the estimate alike share one network
    for name in cfg.compared:
        conditioning = cfg.make_method(name).conditioning
        if conditioning not in counted:
            counted[conditioning] = (parameter_count(cfg, name), *flops_per_image(cfg, name))
        params, train_flops, forward_flops = counted[conditioning]
        weights = 4 * params
        activations = activation_bytes_per_image(cfg) * tc.batch_size
        per_process = weights * TRAINING_COPIES + activations
        on_gpu = machine.device.type == "cuda"
        if on_gpu and per_process > machine.device_memory:
            problems.append(f"model.base_channels / train.batch_size: {name}'s network of {params:.3g} parameters at "
                            f"batch {tc.batch_size} needs about {fmt_bytes(per_process)} of GPU memory per process; "
                            f"{fmt_bytes(machine.device_memory)} is free")
        host = tc.nproc * (PROCESS_OVERHEAD + (0 if on_gpu else per_process))
        if host > machine.memory:
            key = "train.nproc" if tc.nproc * PROCESS_OVERHEAD > machine.memory / 2 else \
                "model.base_channels" if weights * TRAINING_COPIES > activations else "train.batch_size"
            problems.append(f"{key}: {tc.nproc} training process(es) of {name} ({params:.3g} parameters, batch "
                            f"{tc.batch_size}) need about {fmt_bytes(host)} of memory; {fmt_bytes(machine.memory)} "
                            f"is available")
            continue  # what cannot be held needs no time estimate
        store = getattr(cfg.method_config(name), "store", None)
        run_dir = Path(tc.checkpoint_dir)
        need(run_dir, (tc.keep_checkpoints + 1) * weights * 4, "train.keep_checkpoints")
        if store is not None and n is not None and store.policy != "device":
            itemsize = torch.finfo(getattr(torch, store.dtype)).bits // 8
            need(Path(store.directory or run_dir), 2 * n * image_bytes * itemsize, f"method.{name}.store.directory")
        nfe = max(cfg.make_method(name).evaluations(s) for s in getattr(cfg.sampler, name).steps)
        sample_sets = len(getattr(cfg.sampler, name).steps)
        need(Path("out"), cfg.sample.num_samples * image_bytes * sample_sets, "sample.num_samples")
        rate = machine.flop_rate * (tc.nproc if on_gpu else 1)  # CPU processes share the cores measured
        if n is not None:
            epochs, key = cfg.epochs_of(name), "finetune.epochs" if cfg.finetuned(name) else "train.epochs"
            train_time = epochs * n * train_flops / rate
            if train_time > limit:
                problems.append(f"{key}: {epochs} epochs of {n} images for {name} would take about "
                                f"{fmt_hours(train_time)} here (limits.max_hours is {cfg.limits.max_hours:g})")
        sample_time = cfg.sample.num_samples * sample_sets * nfe * forward_flops / machine.flop_rate
        if sample_time > limit:
            problems.append(f"sample.num_samples: {cfg.sample.num_samples} samples x {nfe} network evaluations for "
                            f"{name} would take about {fmt_hours(sample_time)} here (limits.max_hours is "
                            f"{cfg.limits.max_hours:g})")
        if tc.eval_every:  # the learning curve samples inside the training process, its rows at most the sampler's
            points = cfg.epochs_of(name) // tc.eval_every + 1
            curve_time = points * tc.eval_samples * sample_sets * nfe * forward_flops / machine.flop_rate
            if curve_time > limit:
                problems.append(f"train.eval_samples: {points} learning-curve points of {tc.eval_samples} samples x up "
                                f"to {sample_sets * nfe} network evaluations for {name} would take about "
                                f"{fmt_hours(curve_time)} here (limits.max_hours is {cfg.limits.max_hours:g})")
    score_memory = cfg.sample.num_samples * image_bytes * 5  # uint8 samples and their float copy
    if score_memory > machine.memory:
        problems.append(f"sample.num_samples: scoring {cfg.sample.num_samples} samples holds about "
                        f"{fmt_bytes(score_memory)} in memory; {fmt_bytes(machine.memory)} is available")
    curve_memory = tc.eval_samples * image_bytes * 8 if tc.eval_every else 0  # float32 batches and their concatenation
    if curve_memory > machine.memory:
        problems.append(f"train.eval_samples: each learning-curve point holds {tc.eval_samples} samples, about "
                        f"{fmt_bytes(curve_memory)} in memory; {fmt_bytes(machine.memory)} is available")
    for free, needed, keys, where in disk.values():
        if needed > free:
            largest = max(keys, key=keys.get)
            parts = ", ".join(f"{k} {fmt_bytes(b)}" for k, b in keys.items())
            problems.append(f"{largest}: the run needs about {fmt_bytes(needed)} of disk on the file system of "
                            f"{where} ({parts}); {fmt_bytes(free)} is free there")
    return problems


def shard_problems(cfg) -> list[str]:
    """A per-process batch larger than a process's shard of the dataset (it would be cut to the shard)."""
    n = dataset_size(cfg)
    if n is None:
        return []
    shard = math.ceil(n / cfg.train.nproc)
    if cfg.train.batch_size > shard:
        return [f"train.batch_size: {cfg.train.batch_size} per process, but each of the {cfg.train.nproc} process(es) "
                f"trains on a shard of at most {shard} of the {n} images; use at most {shard}"]
    return []
