"""Benchmark of the x0 estimate store (dddm/store.py). Prints figures; not a timed test.

1. Gather + scatter throughput, GB/s of stored estimates moved (bytes gathered + bytes scattered,
   in the storage dtype), per backend, dtype, N, sample shape and batch size, and its ratio to a
   plain in-memory tensor of the same shape and dtype in the same run (`t[idx].float()` and
   `t[idx] = v.to(dtype)`). All three paths take and return float32, as the store's API does.
   Batches are a fresh random permutation per epoch (each sample once per epoch, the store's
   rule), and `begin_epoch` at each epoch boundary is inside the timed blocks. Each path first
   runs one untimed epoch (the Arrow store's first epoch also allocates the file's second slot;
   its time is printed in the note); the large store (--large) is timed cold, from disk. An Arrow
   store whose epoch writes more than the kernel's background-writeback threshold
   (vm.dirty_background_ratio, 10% of available memory by default) is, at a benchmark's write
   rates, bound by the disk's write speed: the note says so (in training the write rate is
   images/s x bytes per estimate, far lower).
   The machine may be shared: each figure is the best of --rounds timed blocks, the paths
   interleaved; --threads 1 avoids oversubscribing a busy CPU.
2. The store's share of one training step at the default configuration (params.yaml: 16x16x1
   images, batch 64, the default U-Net), on this machine's device.

    python bench/bench_store.py              # quick: N=50k, 3x32x32 and 3x64x64, batches 128/1024, fp16/fp32
    python bench/bench_store.py --large      # adds N=1.28M x 3x64x64 fp16: a 31 GB slot in --dir
    python bench/bench_store.py --large-only --skip-step --dir /big/disk
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dddm.store import open_store, store_nbytes  # noqa: E402


def writeback_threshold(available: int) -> int | None:
    """Dirty page-cache bytes above which the kernel starts writing back in the background
    (vm.dirty_background_bytes or vm.dirty_background_ratio); None when unknown."""
    try:
        vm = Path("/proc/sys/vm")
        limit = int((vm / "dirty_background_bytes").read_text())
        return limit or int((vm / "dirty_background_ratio").read_text()) * available // 100
    except (OSError, ValueError):
        return None


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().split("x"))


def best_of(steps: dict, rounds: int, block_time: float) -> dict:
    """Seconds per sample of each step function (which returns the samples it handled): the best
    of `rounds` timed blocks, the functions interleaved round by round (the machine is shared:
    the best block is the least disturbed one, and interleaving gives all paths the same
    conditions)."""
    sizes = {}
    for name, fn in steps.items():  # warm-up, and calls per block
        fn()
        start, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - start < block_time / 4:
            fn()
            calls += 1
        sizes[name] = max(2, round(calls * block_time / (time.perf_counter() - start)))
    best = {name: math.inf for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            samples, start = 0, time.perf_counter()
            for _ in range(sizes[name]):
                samples += fn()
            best[name] = min(best[name], (time.perf_counter() - start) / samples)
    return best


class Batches:
    """Random batches covering all n indices once per epoch (the last one smaller), as the training
    loop visits them; with a store, each epoch starts with store.begin_epoch."""

    def __init__(self, n: int, batch: int, store=None, seed: int = 0):
        self.n, self.batch, self.store = n, batch, store
        self.gen = torch.Generator().manual_seed(seed)
        self.queue: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self.queue:
            if self.store is not None:
                self.store.begin_epoch(self.store.epoch + 1)
            self.queue = list(torch.randperm(self.n, generator=self.gen).split(self.batch))[::-1]
        return self.queue.pop()


def pair_step(kind: str, obj, n: int, shape, dtype: torch.dtype, batch: int, seed: int = 0):
    """One gather + scatter of a batch (float32 in and out), as a function returning its size."""
    values = torch.randn(batch, *shape)
    batches = Batches(n, batch, None if kind == "tensor" else obj, seed=seed)
    if kind == "tensor":
        def step():
            idx = batches.next()
            est = obj[idx].float()
            obj[idx] = (est + values[: len(idx)]).to(dtype)
            return len(idx)
    else:
        def step():
            idx = batches.next()
            est = obj.gather(idx)
            obj.scatter(idx, est + values[: len(idx)])
            return len(idx)
    return step


def throughput_table(args) -> None:
    device = torch.device("cpu")
    print(f"\n== gather + scatter throughput on {device} ({torch.get_num_threads()} threads), "
          f"RAM {psutil.virtual_memory().total / 1e9:.1f} GB total, "
          f"{psutil.virtual_memory().available / 1e9:.1f} GB available")
    configs = [] if args.large_only else [(n, parse_shape(s), d) for n in args.n for s in args.shapes
                                          for d in args.dtypes]
    if args.large or args.large_only:
        configs.append((1_281_167, (3, 64, 64), "float16"))
    header = (f"{'backend':8} {'dtype':8} {'N':>9} {'shape':8} {'batch':>5} {'ms/pair':>8} {'GB/s':>7} "
              f"{'ratio':>6}  note")
    print(header)
    print("-" * len(header))
    for n, shape, dtype_name in configs:
        dtype = getattr(torch, dtype_name)
        numel = math.prod(shape)
        slot_bytes = store_nbytes(n, shape, dtype_name)
        available = psutil.virtual_memory().available
        large = slot_bytes > args.device_limit * available
        # the plain tensor (and the device store) must fit in RAM: for a large store the baseline
        # tensor has the same sample shape but fewer rows, and there is no device store
        n_mem = n if not large else min(n, int(args.baseline_bytes) // (numel * dtype.itemsize))
        tensor = torch.empty(n_mem, *shape, dtype=dtype)
        for chunk in tensor.split(4096):
            chunk.copy_(torch.randn(chunk.shape))
        directory = Path(args.dir) / f"store-{n}-{'x'.join(map(str, shape))}-{dtype_name}"
        if directory.exists():
            shutil.rmtree(directory)
        t0 = time.perf_counter()
        arrow = open_store("arrow", directory, n, shape, dtype_name, 0, "bench", "cpu")
        created = time.perf_counter() - t0
        device_store = None if large else open_store("device", directory, n, shape, dtype_name, 0, "bench", "cpu")
        file_bytes = os.path.getsize(arrow.path)
        fits = 2 * slot_bytes < available  # both slots get touched over epochs
        dirty = writeback_threshold(available)
        note_file = (f"file {file_bytes / 1e9:.2f} GB ({slot_bytes / 1e9:.2f} GB per slot) created in "
                     f"{created:.1f} s; {'fits' if fits else 'does NOT fit'} in the page cache "
                     f"({available / 1e9:.1f} GB available)"
                     + (f"; an epoch writes more than the background-writeback threshold "
                        f"({dirty / 1e9:.1f} GB): its stores meet writeback and, at these rates, the disk's "
                        f"write speed" if dirty and slot_bytes > dirty else ""))
        for batch in args.batches:
            moved = 2 * batch * numel * dtype.itemsize
            steps = {"tensor": pair_step("tensor", tensor, n_mem, shape, dtype, batch)}
            if device_store is not None:
                steps["device"] = pair_step("store", device_store, n, shape, dtype, batch)
            steps["arrow"] = pair_step("store", arrow, n, shape, dtype, batch)
            warm = ""
            if not large:  # steady state: one full epoch first (it also allocates the Arrow file's second slot)
                for name, step in steps.items():
                    start, done = time.perf_counter(), 0
                    while done < n:
                        done += step()
                    if name == "arrow":
                        warm = f"; warm-up epoch {(time.perf_counter() - start) / n * batch * 1e3:.2f} ms/pair"
            best = best_of(steps, args.rounds, args.large_time if large else args.block_time)
            notes = {"tensor": f"in-memory baseline, N={n_mem}" if n_mem != n else "in-memory baseline",
                     "arrow": note_file + warm}
            note_file = ""
            for name, per_sample in best.items():
                sec = per_sample * batch
                print(f"{name:8} {dtype_name:8} {n:>9} {'x'.join(map(str, shape)):8} {batch:>5} {sec * 1e3:8.2f} "
                      f"{moved / sec / 1e9:7.2f} {best['tensor'] / per_sample:6.2f}  {notes.get(name, '')}",
                      flush=True)
        arrow.close()
        del device_store, tensor, arrow
        shutil.rmtree(directory)


def step_share(args) -> None:
    print("\n== the store's share of one training step (default config: 16x16x1, batch 64, "
          "U-Net base 32, mult (1, 2), 1 block, attention at 8)")
    try:
        from dddm.unet import UNet
        net = UNet(image_size=16, channels=1, base_channels=32, channel_mult=(1, 2), num_blocks=1,
                   attn_resolutions=(8,), dropout=0.1)
    except Exception as e:  # noqa: BLE001 - the U-Net is written elsewhere; report and skip
        print(f"skipped: dddm.unet.UNet is not usable yet ({type(e).__name__}: {e})")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    batch, shape, n = 64, (1, 16, 16), args.step_n
    x0_est, x_t = torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device)
    label = torch.rand(batch, device=device)

    def train_step():
        out = net(x0_est, x_t, label)
        loss = (out - x_t).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1
    t_step = best_of({"step": train_step}, args.rounds, 4 * args.block_time)["step"]
    print(f"train step (forward + backward + Adam) on {device}: {t_step * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for backend in ("device", "arrow"):
            for dtype_name in ("float32", "float16"):
                store = open_store(backend, Path(tmp) / f"{backend}-{dtype_name}", n, shape, dtype_name, 0,
                                   "bench", device)
                batches = Batches(n, batch, store)

                def pair():
                    idx = batches.next()
                    est = store.gather(idx)
                    store.scatter(idx, est)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return len(idx)
                t_store = best_of({"pair": pair}, args.rounds, args.block_time)["pair"] * batch
                print(f"store {backend:6} {dtype_name:8} N={n}: gather + scatter {t_store * 1e3:.3f} ms = "
                      f"{100 * t_store / (t_step + t_store):.2f}% of a step (target <= 3%)")
                store.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[50_000], help="dataset sizes (default 50000)")
    p.add_argument("--shapes", nargs="+", default=["3x32x32", "3x64x64"])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--large", action="store_true", help="add N=1,281,167 x 3x64x64 fp16 (ImageNet 64: 31 GB per slot)")
    p.add_argument("--large-only", action="store_true", help="only the large configuration")
    p.add_argument("--dir", default=None, help="where store files go (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per measurement; the best one counts")
    p.add_argument("--block-time", type=float, default=0.2, help="seconds per timed block")
    p.add_argument("--large-time", type=float, default=2.0, help="seconds per timed block of the large store")
    p.add_argument("--device-limit", type=float, default=0.3,
                   help="above this share of available RAM a slot is 'large': no device store, capped baseline")
    p.add_argument("--baseline-bytes", type=float, default=2e9, help="size of the baseline tensor for a large store")
    p.add_argument("--step-n", type=int, default=1797, help="dataset size for the step share (digits: 1797)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    own_dir = args.dir is None
    args.dir = tempfile.mkdtemp(prefix="bench_store-") if own_dir else args.dir
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    print(f"store directory {args.dir} ({free / 1e9:.1f} GB free); torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: best of "
          f"{args.rounds} blocks per figure)")
    if (args.large or args.large_only) and free < 40e9:
        sys.exit(f"--large needs > 40 GB free in {args.dir}, found {free / 1e9:.1f} GB")
    try:
        if not args.skip_throughput:
            throughput_table(args)
        if not args.skip_step:
            step_share(args)
    finally:
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
