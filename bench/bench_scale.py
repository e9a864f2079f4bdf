"""ImageNet 64x64 at full scale through the spill store, on this machine. Prints figures; not a test.

1. Writes a synthetic set in the downsampled-ImageNet format (train_data_batch_1..10: pickled dicts of
   uint8 N x 12288 CHW rows and labels 1..1000) of --images images (default ImageNet's 1,281,167:
   15.7 GB) under --dir, and prepares it with the project's `imagenet64` source (one batch in memory
   at a time): prepare time and the preparing process's peak RSS. The source files are then removed.
2. Trains uDDDM (fp16 store, `store.policy: auto`) with a small network on it, and on a small set of
   --small-images prepared the same way, whose store fits in memory: interleaved rounds (small, full,
   small, ...), each a fresh run stopped after --warmup + --steps steps. Per run: time to the first step
   (opening the dataset and creating the store), the store backend auto chose, img/s and the store's
   share of a step (medians over the steps after the warm-up), peak RSS (VmHWM) of the trainer.

    python bench/bench_scale.py --dir /big/disk          # needs about 48 GB free there
    python bench/bench_scale.py --dir /tmp/s --images 200000 --small-images 20000 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench_training import ROOT, step_figures, worker_command, write_variant

IMAGENET_TRAIN_IMAGES = 1_281_167
NETWORK = {"base_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
           "num_heads": 4}


def write_synthetic_imagenet64(directory: Path, images: int, seed: int) -> None:
    """Ten batches in the downsampled-ImageNet pickle format; smooth random images, so resizing and
    the network see structure rather than white noise."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, part in enumerate(np.array_split(np.arange(images), 10), start=1):
        coarse = rng.integers(0, 256, size=(len(part), 3, 8, 8), dtype=np.uint8)
        data = coarse.repeat(8, axis=2).repeat(8, axis=3).reshape(len(part), -1)
        labels = rng.integers(1, 1001, size=len(part)).tolist()
        with open(directory / f"train_data_batch_{k}", "wb") as f:
            pickle.dump({"data": data, "labels": labels, "mean": None}, f, protocol=4)
        del data


def prepare(source: Path, out: Path) -> dict:
    """The project's imagenet64 preparation in a process of its own: seconds, its peak RSS (VmHWM), and
    the peak of its anonymous memory (sampled): RSS also counts the pages of its memory-mapped files,
    which the kernel reclaims under pressure."""
    code = ("import sys; from dddm.data import prepare_dataset; "
            "prepare_dataset('imagenet64', sys.argv[1], 64, sys.argv[2], progress=False)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(source), str(out)], stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    peak = anon = 0.0
    while proc.poll() is None:
        status = proc_status(proc.pid)
        peak, anon = max(peak, status.get("VmHWM", 0.0)), max(anon, status.get("RssAnon", 0.0))
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"preparing {source} failed:\n{proc.stderr.read()[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gb": peak, "peak_anon_gb": anon,
            "size_gb": out.stat().st_size / 1e9}


def proc_status(pid: int) -> dict[str, float]:
    """/proc/<pid>/status memory lines in GB (empty once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 2**20 for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


def train_until(work: Path, prepared: Path, steps: int, threads: int) -> dict:
    """Run the trainer until its history has `steps` rows, then stop it (SIGTERM)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    history = work / "run" / "history.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(worker_command(work, "udddm", prepared, 1), env=env, stderr=subprocess.PIPE, text=True)
    first_step = None
    rss = 0.0
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the trainer in {work} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            rows = history.read_text().count("\n") if history.exists() else 0
            if rows and first_step is None:
                first_step = time.perf_counter() - t0
            rss = max(rss, proc_status(proc.pid).get("VmHWM", 0.0))
            if rows >= steps:
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait()
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    backend = "arrow" if any((work / "run").rglob("*.arrow")) else "device"
    return {"rows": rows, "first_step_s": first_step, "peak_rss_gb": rss, "backend": backend}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="work directory on a disk with ~48 GB free")
    ap.add_argument("--images", type=int, default=IMAGENET_TRAIN_IMAGES)
    ap.add_argument("--small-images", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run, after the warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="full-size runs; small runs go before and after each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prepare-only", action="store_true", help="stop after preparing (its figures only)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared files and runs in --dir")
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    prepared = {}
    for name, images in (("small", args.small_images), ("full", args.images)):
        source = args.dir / f"source-{name}"
        t0 = time.perf_counter()
        write_synthetic_imagenet64(source, images, seed=len(name))
        written = time.perf_counter() - t0
        prepared[name] = args.dir / f"prepared-{name}.arrow"
        figures = prepare(source, prepared[name])
        shutil.rmtree(source)
        print(f"{name}: {images} images, source written in {written:.0f} s; prepared {figures['size_gb']:.1f} GB in "
              f"{figures['seconds']:.0f} s ({images / figures['seconds']:.0f} img/s), "
              f"peak RSS {figures['peak_rss_gb']:.2f} GB (anonymous {figures['peak_anon_gb']:.2f} GB)", flush=True)

    if args.prepare_only:
        return
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="imagenet64", path=str(args.dir), image_size=64)
    params["model"] = NETWORK
    params["methods"] = ["udddm"]
    params["method"]["udddm"]["store"].update(policy="auto", dtype="float16")
    params["train"].update(epochs=1000, batch_size=args.batch, checkpoint_every=10**9)
    params["tracking"]["grid_every_epochs"] = 0

    order = ["small"] + ["full", "small"] * args.rounds
    results = {"small": [], "full": []}
    for k, name in enumerate(order):
        work = write_variant(args.dir, f"run{k}-{name}", params)
        run = train_until(work, prepared[name], args.warmup + args.steps, args.threads)
        figures = step_figures(run["rows"][args.warmup:args.warmup + args.steps])
        results[name].append(run | figures)
        print(f"run {k} {name}: store {run['backend']}, first step after {run['first_step_s']:.0f} s, "
              f"{figures['img_per_s']:.1f} img/s, store {100 * figures['store']:.2f}% of a step, "
              f"peak RSS {run['peak_rss_gb']:.2f} GB", flush=True)
        if not args.keep:
            shutil.rmtree(work)

    small = statistics.median(r["img_per_s"] for r in results["small"])
    print(f"\nuDDDM, fp16 store, 3x64x64, batch {args.batch}, network {NETWORK}, {args.threads} thread(s); "
          f"medians of steps {args.warmup + 1}..{args.warmup + args.steps} of each run")
    print(f"{'run':>6s} {'N':>9s} {'store':>6s} {'img/s':>7s} {'vs small':>8s} {'store %':>8s} {'RSS GB':>7s} "
          f"{'1st step s':>10s}")
    for name, images in (("small", args.small_images), ("full", args.images)):
        for r in results[name]:
            print(f"{name:>6s} {images:9d} {r['backend']:>6s} {r['img_per_s']:7.1f} {r['img_per_s'] / small:8.2f} "
                  f"{100 * r['store']:8.2f} {r['peak_rss_gb']:7.2f} {r['first_step_s']:10.0f}")
    if not args.keep:
        for path in prepared.values():
            path.unlink()


if __name__ == "__main__":
    main()
