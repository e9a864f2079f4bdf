"""The CUDA path in one prepared run, for a lent GPU machine's single call (README, "GPU check").

    python3 bench/gpu_check.py --out $OUT              # the GPU machine (wheels: bash bench/gpu_wheels.sh, here)
    python bench/gpu_check.py --cpu-smoke --out /tmp/gc  # every case at its smallest size, on a CPU

It first installs the wheels in .whl/ that this Python lacks (bench/gpu_wheels.sh; the GPU machine has no
registry). Each case is isolated (its exception becomes its row) and under a time limit; none starts after
--budget seconds ("skipped: time"). The cases:
- train: dddm.training.train for udddm (x0 store forced to the device, then to Arrow), ict, edm, and ect
  fine-tuned from that edm model, with train.bf16 on and off, eager, then under train.compile, on the
  prepared digits; the final loss must be finite and the EMA model's samples are scored with the classifier
  fallback as the learning curve scores them (dddm.curves.LearningCurve, data/classifier.pt);
- resume: bench/bench_training.py's worker killed with SIGKILL after its first checkpoint, rerun to the end,
  against an uninterrupted run: weights_sha256 equal, else the largest weight difference, beside that of a
  second uninterrupted run (the kernels' own nondeterminism);
- throughput: a large bf16 matmul's rate (the peak); dddm's loop at the paper's CIFAR-10 network
  (presets/cifar10-vp.yaml) on synthetic 32x32 images, with its share of that peak (FLOPs per image from
  bench/count_flops.py); at bench/bench_peer.py's shared network, dddm's loop against the authors' step
  (bench_peer.peer_variant on a checkout staged in .whl/peer, or --peer-dir);
- store: gather + scatter of the ImageNet-64 preset's per-rank x0 store (bench/bench_store.py's pair_step),
  on the device and spilled to Arrow, as a share of dddm's loop step at that preset's network.
Prints one table and writes it to <out>/gpu_check.json after every case (a run cut off still returns what
ran); dddm's log and each failure's traceback go to <out>/gpu_check.log.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib import metadata
from pathlib import Path

STARTED = time.monotonic()  # the budget counts the pip step and the imports too: the device call's limit does
ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "gpu_check_site"


def carried_wheels(wheel_dir: Path) -> dict[str, str]:
    """{distribution: version} of the wheels in wheel_dir (one file per Python version of each)."""
    return dict(path.name.split("-")[:2] for path in sorted(wheel_dir.glob("*.whl")))


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheels_to_install(carried: dict[str, str], installed=installed_version) -> list[str]:
    """`name==version` of each carried wheel this Python lacks or has at another version."""
    return [f"{name}=={version}" for name, version in sorted(carried.items()) if installed(name) != version]


def install_carried_wheels(wheel_dir: Path, target: Path) -> list[str]:
    """pip-install (no index) the carried wheels this Python lacks into `target`, put first on the path of this
    process and of its children; pip picks each one's file for this Python."""
    wanted = wheels_to_install(carried_wheels(wheel_dir)) if wheel_dir.is_dir() else []
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(target), "--find-links", str(wheel_dir), *wanted], check=True)
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return wanted


if __name__ == "__main__":  # before the imports below, which need pydantic (absent on the GPU machine)
    print(f"python {platform.python_version()} ({sys.executable}); torch {installed_version('torch')}", flush=True)
    INSTALLED = install_carried_wheels(WHEELS, SITE)
    print(f"installed from {WHEELS}: {', '.join(INSTALLED) or 'nothing'}", flush=True)

sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

import bench_peer  # noqa: E402
import bench_store  # noqa: E402
import count_flops  # noqa: E402
from bench_training import step_figures, worker_command, write_variant  # noqa: E402
from dddm import checkpoint  # noqa: E402
from dddm.config import merge_params, parse_config  # noqa: E402
from dddm.curves import LearningCurve, column, curve_steps  # noqa: E402
from dddm.data import PreparedDataset, prepare_dataset  # noqa: E402
from dddm.compute import resolve_device  # noqa: E402
from dddm.finetune import load_initialisation  # noqa: E402
from dddm.limits import KNOWN_SIZES  # noqa: E402
from dddm.performance import bf16_autocast  # noqa: E402
from dddm.store import open_store, store_nbytes  # noqa: E402
from dddm.store.ownership import count_owned  # noqa: E402
from dddm.training import train  # noqa: E402

log = logging.getLogger("gpu_check")
CLASSIFIER = ROOT / "data" / "classifier.pt"
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
GRACE_S = 45  # a case running at --budget may go on this long
SMALLEST = {"base_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
            "num_heads": 2}
SIZES = {
    # train: the matrix's train.* (batch 599 = 1797 / 3: equal batches, so one compiled shape); steps: synthetic
    # images per epoch = steps x the batch; blocks: bench_store.best_of's rounds and seconds per block
    "gpu": {"model": {}, "sampler": {}, "train": {"epochs": 2, "batch_size": 599, "eval_every": 2},
            "resume": {"epochs": 4, "batch_size": 64, "checkpoint_every": 10},
            "cifar_steps": 16, "imagenet_steps": 5, "batch": None, "store_samples": None, "store_batch": None,
            "rounds": 7, "warmup": 2, "blocks": (5, 0.2), "matmul": 8192,
            "limits": {"train": 90, "compile": 240, "resume": 180, "peak": 60, "loop": 150, "store": 150}},
    "cpu-smoke": {"model": SMALLEST, "sampler": {"edm": {"steps": [4]}},
                  "train": {"epochs": 2, "batch_size": 599, "eval_every": 2},
                  "resume": {"epochs": 2, "batch_size": 128, "checkpoint_every": 5},
                  "cifar_steps": 2, "imagenet_steps": 2, "batch": 4, "store_samples": 256, "store_batch": 4,
                  "rounds": 1, "warmup": 1, "blocks": (1, 0.02), "matmul": 256,
                  "limits": {"train": 60, "compile": 60, "resume": 90, "peak": 30, "loop": 60, "store": 60}},
}


class CaseTimeout(BaseException):
    """A case ran past its limit (a BaseException: an `except Exception` inside the case cannot swallow it)."""


class CheckFailed(Exception):
    """A case ran, but what it produced is wrong."""


class Skipped(Exception):
    """A case cannot run here; the message says why."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())


def cli_output(main, argv: list[str]) -> str:
    """What a bench script's main() prints for the command line `argv`."""
    saved, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            main()
    finally:
        sys.argv = saved
    return out.getvalue()


class Check:
    """The cases' shared state and the table they fill."""

    def __init__(self, out: Path, work: Path, smoke: bool, budget: float, peer_dir: Path, environment: dict):
        self.out, self.work, self.smoke, self.budget, self.peer_dir = out, work, smoke, budget, peer_dir
        self.size = SIZES["cpu-smoke" if smoke else "gpu"]
        self.cuda = torch.cuda.is_available()
        self.device = resolve_device("cuda" if self.cuda else "cpu")
        self.rows: list[dict] = []
        self.environment = environment
        self.models: dict[tuple[str, bool], Path] = {}  # (method, bf16) -> the eager row's model.pt
        self.peak: float | None = None  # bf16 FLOP/s
        self.authors: dict[bool, dict] = {}  # bf16 -> the authors' img/s and parameter count
        self.imagenet_step_s: float | None = None
        self.flops: dict[str, float] = {}
        self.digits = work / "digits.arrow"
        prepare_dataset("digits", None, 8, self.digits, progress=False)

    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    # -- running and recording
    def run(self, name: str, fn, limit: str, cuda_only: bool = False, smoke_skip: str | None = None) -> None:
        if not self.cuda and (cuda_only or not self.smoke):
            return self.record(name, "skipped: no CUDA", 0.0, {})
        if self.smoke and smoke_skip:
            return self.record(name, f"skipped: {smoke_skip}", 0.0, {})
        left = self.budget - self.elapsed()
        if left <= 0:
            return self.record(name, "skipped: time", 0.0, {})
        seconds = min(self.size["limits"][limit], left + GRACE_S)
        log.info("== %s (limit %.0f s)", name, seconds)
        previous = signal.signal(signal.SIGALRM, self._timeout)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        start, figures = time.monotonic(), {}
        try:
            figures = fn() or {}
            status = "ran"
        except CaseTimeout:
            status = f"failed: timed out after {seconds:.0f} s"
            log.exception("%s: %s", name, status)
        except Skipped as e:
            status = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - every failure is the case's row; the rest go on
            status = f"failed: {first_line(e)}"
            log.exception("%s failed", name)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self.record(name, status, time.monotonic() - start, figures)

    @staticmethod
    def _timeout(signum, frame):
        raise CaseTimeout()

    def record(self, name: str, status: str, seconds: float, figures: dict) -> None:
        self.rows.append({"case": name, "status": status, "seconds": round(seconds, 1), **figures})
        print(f"[{self.elapsed():5.0f} s] {name}: {status} {shown(figures)}", flush=True)
        self.write()

    def write(self) -> None:
        report = {"mode": "cpu-smoke" if self.smoke else "gpu", "budget_s": self.budget,
                  "elapsed_s": round(self.elapsed(), 1), "environment": self.environment, "cases": self.rows}
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")

    # -- helpers of the cases
    def params(self, *overrides: dict) -> dict:
        raw = PARAMS
        for override in overrides:
            raw = merge_params(raw, override)
        return raw

    def loop(self, name: str, cfg, prepared: Path, method: str = "udddm", init=None, curve=None):
        """dddm.training.train in this case's directory: the result and bench_training's figures of the steps
        after the first epoch (the warm-up: allocation, cuDNN's choices)."""
        work = self.work / slug(name)
        result = train(cfg, method, prepared, work / "out", work / "run", progress=False, init=init, curve=curve)
        rows = [json.loads(line) for line in result.history_path.read_text().splitlines()]
        return result, step_figures([r for r in rows if r["epoch"] > rows[0]["epoch"]] or rows)

    def synthetic(self, cfg) -> Path:
        """The prepared dataset of a throughput run: random RGB images (the folder source, from PNG files),
        a few batches per epoch."""
        size = cfg.data.image_size
        images = self.size["imagenet_steps" if size == 64 else "cifar_steps"] * cfg.train.batch_size
        folder = self.work / f"synthetic-{size}-{images}"
        if not folder.exists():
            folder.mkdir()
            rng = np.random.default_rng(0)
            for i in range(images):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
            prepare_dataset("folder", str(folder), size, folder.with_suffix(".arrow"), progress=False)
        return folder.with_suffix(".arrow")

    def shrunk(self, network: dict) -> dict:
        """A preset's network, at its smallest under --cpu-smoke."""
        return merge_params(network, {"model": self.size["model"]})

    def synthetic_run(self, name: str, network: dict, bf16: bool):
        """The config of a throughput run on synthetic images: params.yaml, then `network` (a preset's keys);
        --cpu-smoke shrinks the batch."""
        return parse_config(self.params(network, {
            "methods": ["udddm"], "finetune": {"methods": []},
            "train": {"epochs": 2, "batch_size": self.size["batch"] or network["train"]["batch_size"],
                      "checkpoint_every": 0, "eval_every": 0, "bf16": bf16, "compile": False,
                      "device": self.device.type, "nproc": 1, "nnodes": 1}}), name)

    def flops_per_image(self, name: str, network: dict) -> float:
        """Training FLOPs per image of uDDDM at `network` (a preset's keys), as bench/count_flops.py counts them."""
        if name not in self.flops:
            path = self.work / f"{slug(name)}.yaml"
            path.write_text(yaml.safe_dump(network))
            printed = cli_output(count_flops.main, ["count_flops.py", str(path)])
            self.flops[name] = float(re.search(r"([0-9.e+-]+) training FLOPs per image", printed)[1])
        return self.flops[name]

    def throughput(self, figures: dict, flops: float) -> dict:
        achieved = figures["img_per_s"] * flops
        return {"img_per_s": round(figures["img_per_s"], 1), "step_ms": round(1e3 * figures["step_s"], 2),
                "flops_per_image": flops, "tflop_s": round(achieved / 1e12, 2),
                "share_of_bf16_peak": round(achieved / self.peak, 4) if self.peak else None}


def shown(figures: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())


# -- cases: the training loop per method and option
TRAIN_ROWS = [("udddm", "device"), ("udddm", "arrow"), ("ict", None), ("edm", None), ("ect", None)]


def train_case(c: Check, name: str, method: str, policy: str | None, bf16: bool, compiled: bool) -> dict:
    info = PreparedDataset(c.digits).info
    overrides = {"model": c.size["model"], "sampler": c.size["sampler"],
                 "finetune": {"epochs": c.size["train"]["epochs"]},
                 "train": {**c.size["train"], "checkpoint_every": 0, "eval_samples": 160, "device": c.device.type,
                           "bf16": bf16, "compile": compiled}}
    if policy:
        overrides["method"] = {"udddm": {"store": {"policy": policy}}}
    if method == "ect":  # fine-tuned from the edm row's model, as pipeline/train.py builds `init`
        if ("edm", bf16) not in c.models:
            raise Skipped(f"no edm model with bf16 {'on' if bf16 else 'off'} (its eager row did not run)")
        overrides["finetune"]["init_from"] = str(c.models[("edm", bf16)])
    cfg = parse_config(c.params(overrides), name)
    m = cfg.make_method(method)
    init = load_initialisation(cfg, m, info.image_size, info.channels) if cfg.finetuned(method) else None
    shape = (info.channels, info.image_size, info.image_size)
    curve = LearningCurve(m, shape, c.work / slug(name) / "run", CLASSIFIER, cfg.score, cfg.train.eval_samples,
                          c.device)
    if compiled:
        torch._dynamo.reset()  # each network compiles afresh, below dynamo's per-function recompile limit
    result, figures = c.loop(name, cfg, c.digits, method, init, curve)
    out = result.model_path.parent
    loss = json.loads((out / "train_metrics.json").read_text())["loss"]
    point, fewest = curve.rows()[-1], curve_steps(m.sampler.steps)[0]  # the curve's fewest-step row
    fid = point[column("fid_classifier", fewest)]
    check(math.isfinite(loss), f"final loss {loss}")
    check(math.isfinite(fid), f"fid_classifier of {fewest}-step samples {fid}")
    if not compiled:
        c.models[(method, bf16)] = result.model_path
    return {"steps": result.global_step, "final_loss": round(loss, 5), "sampling_steps": fewest,
            "fid_classifier": round(fid, 2), "classes": point[column("classes", fewest)],
            "img_per_s": round(figures["img_per_s"], 1),
            "store": result.store.backend if result.store is not None else "none"}


# -- case: kill -9 and resume
def resume_case(c: Check) -> dict:
    params = c.params({"model": {**c.size["model"], "dropout": 0.1},  # dropout: the restored RNG states count
                       "train": {**c.size["resume"], "eval_every": 0, "device": c.device.type},
                       "method": {"udddm": {"store": {"policy": "device"}}}})
    tmp = c.work / "resume"
    tmp.mkdir()

    def worker(name: str, wait: bool = True):
        work = tmp / name if (tmp / name).exists() else write_variant(tmp, name, params)
        with open(work / "worker.log", "a") as logfile:
            proc = subprocess.Popen(worker_command(work, "udddm", c.digits, 1), stdout=logfile,
                                    stderr=subprocess.STDOUT)
        try:
            code = proc.wait() if wait else 0
        except BaseException:  # a timeout: the worker goes with its case
            proc.kill()
            proc.wait()
            raise
        if code:
            text = (work / "worker.log").read_text()
            log.error("%s worker's log:\n%s", name, text)
            raise CheckFailed(f"{name}: exit {code}: {text.strip().splitlines()[-1:]}")
        return work, proc

    def model(work: Path) -> dict:
        return torch.load(work / "out" / "model.pt", map_location="cpu", weights_only=True)

    whole, _ = worker("whole")
    killed, proc = worker("killed", wait=False)
    try:
        while not checkpoint.complete(killed / "run") and proc.poll() is None:
            time.sleep(0.002)
    finally:
        proc.kill()  # SIGKILL: after the first checkpoint, or on a timeout
        proc.wait()
    check(not (killed / "out" / "model.pt").exists(), "the run ended before the kill; nothing was resumed")
    saved = checkpoint.step_of(checkpoint.latest(killed / "run"))
    steps_done = len((killed / "run" / "history.jsonl").read_text().splitlines())
    worker("killed")
    a, b = model(whole), model(killed)
    figures = {"killed_after_step": steps_done, "resumed_from_step": saved,
               "steps": json.loads((killed / "out" / "train_info.json").read_text())["steps"],
               "weights": "equal" if a["weights_sha256"] == b["weights_sha256"] else "differ"}
    if figures["weights"] == "differ":
        again = model(worker("whole-again")[0])
        figures["max_abs_diff_resumed"] = max_abs_diff(a["state_dict"], b["state_dict"])
        figures["max_abs_diff_uninterrupted_twice"] = max_abs_diff(a["state_dict"], again["state_dict"])
        check(c.device.type == "cuda", "a resumed CPU run must equal the uninterrupted one bit for bit")
    return figures


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# -- cases: throughput
def peak_case(c: Check) -> dict:
    n = c.size["matmul"]
    x, y = (torch.randn(n, n, device=c.device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        x @ y
    sync(c.device)
    start = time.perf_counter()
    for _ in range(10):
        x @ y
    sync(c.device)
    c.peak = 10 * 2 * n ** 3 / (time.perf_counter() - start)
    return {"n": n, "tflop_s": round(c.peak / 1e12, 1)}


def paper_case(c: Check) -> dict:
    network = c.shrunk(merge_params(preset("cifar10-vp"), {"data": {"source": "folder", "path": "synthetic"}}))
    cfg = c.synthetic_run("paper network", network, bf16=True)
    result, figures = c.loop("throughput paper network", cfg, c.synthetic(cfg))
    return {"batch": cfg.train.batch_size, "params": sum(p.numel() for p in result.net.parameters()),
            **c.throughput(figures, c.flops_per_image("paper network", network))}


def peer_network() -> dict:
    """bench_peer.py's shared network and uDDDM-VP at the authors' settings, as params."""
    p = bench_peer
    return {"data": {"source": "folder", "path": "synthetic", "image_size": p.SIZE},
            "model": {"base_channels": p.WIDTH, "channel_mult": list(p.MULT), "num_blocks": p.BLOCKS,
                      "attn_resolutions": [p.ATTN], "dropout": 0.0, "num_heads": p.HEADS},
            "method": {"udddm": {"process": "vp", "conditioning": "concat", "metric": "pseudo_huber", "huber_c": None,
                                 "processes": {"vp": {"T": p.T, "beta_min": p.BETA_MIN, "beta_max": p.BETA_MAX}}}},
            "train": {"lr": p.LR, "ema_decay": p.EMA, "batch_size": 128}}


def peer_batch(c: Check) -> int:
    return c.size["batch"] or peer_network()["train"]["batch_size"]


def authors_case(c: Check, bf16: bool) -> dict:
    if not (c.peer_dir / "DDDM" / "unet.py").is_file():
        raise Skipped(f"no checkout of the authors' code at {c.peer_dir} (bash bench/gpu_wheels.sh PEER_CHECKOUT)")
    peer = bench_peer.load_peer(c.peer_dir)
    batch = peer_batch(c)
    with torch.device(c.device):  # bench_peer builds on the default device
        net, step, _ = bench_peer.peer_variant(peer, batch, bf16=False)
    # around their whole step, not only the forward as bench_peer puts it: backward and optimizer have no ops
    # that autocast casts
    autocast = bf16_autocast(c.device, cuda_bf16=bf16, cpu_bf16=False)

    def timed():
        with torch.device(c.device), autocast:
            step()
        sync(c.device)

    seconds = bench_peer.time_interleaved({"authors": timed}, c.size["rounds"], c.size["warmup"])["authors"]
    c.authors[bf16] = {"img_per_s": batch / seconds, "params": bench_peer.count(net)}
    return {"batch": batch, "params": c.authors[bf16]["params"], "img_per_s": round(batch / seconds, 1)}


def dddm_peer_case(c: Check, bf16: bool) -> dict:
    cfg = c.synthetic_run("peer network", merge_params(peer_network(), {"train": {"batch_size": peer_batch(c)}}), bf16)
    result, figures = c.loop(f"throughput peer network bf16 {bf16}", cfg, c.synthetic(cfg))
    params, authors = sum(p.numel() for p in result.net.parameters()), c.authors.get(bf16)
    check(authors is None or params == authors["params"], f"{params} parameters, the authors' network {authors}")
    return {"batch": cfg.train.batch_size, "params": params,
            **c.throughput(figures, c.flops_per_image("peer network", peer_network())),
            "vs_authors": round(figures["img_per_s"] / authors["img_per_s"], 3) if authors else None}


# -- cases: the x0 store against a step at the ImageNet-64 preset
def imagenet_network() -> dict:
    return merge_params(preset("imagenet64-vp"), {"data": {"source": "folder", "path": "synthetic"}})


def imagenet_step_case(c: Check) -> dict:
    cfg = c.synthetic_run("imagenet64 network", c.shrunk(imagenet_network()), bf16=True)
    result, figures = c.loop("store imagenet64 step", cfg, c.synthetic(cfg))
    c.imagenet_step_s = figures["step_s"]
    return {"batch": cfg.train.batch_size, "params": sum(p.numel() for p in result.net.parameters()),
            "img_per_s": round(figures["img_per_s"], 1), "step_ms": round(1e3 * figures["step_s"], 2)}


def store_case(c: Check, backend: str) -> dict:
    cfg = parse_config(c.params(imagenet_network()), "presets/imagenet64-vp.yaml")
    dtype = cfg.method.udddm.store.dtype
    shape = (3, cfg.data.image_size, cfg.data.image_size)
    n = c.size["store_samples"] or count_owned(KNOWN_SIZES["imagenet64"], 0, cfg.train.world_size)
    batch = c.size["store_batch"] or cfg.train.batch_size
    directory = c.work / f"store-{backend}"
    start = time.perf_counter()
    store = open_store(backend, directory, n, shape, dtype, cfg.seed, "gpu_check", c.device)
    created = time.perf_counter() - start
    try:
        with torch.device(c.device):  # pair_step's values on the device; its batches stay on the CPU
            pair = bench_store.pair_step("store", store, n, shape, getattr(torch, dtype), batch)

        def synced():
            done = pair()
            sync(c.device)
            return done
        seconds = bench_store.best_of({"pair": synced}, *c.size["blocks"])["pair"] * batch
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)
    step = c.imagenet_step_s
    return {"samples": n, "dtype": dtype, "gb": round(store_nbytes(n, shape, dtype) / 1e9, 2),
            "created_s": round(created, 1), "batch": batch, "gather_scatter_ms": round(1e3 * seconds, 3),
            "share_of_step": round(seconds / (step + seconds), 4) if step else None}


# -- the run
def environment(smoke: bool, installed: list[str], peer_dir: Path) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "installed_wheels": installed, "peer_dir": str(peer_dir),
           "cpu_count": os.cpu_count(), "mode": "cpu-smoke" if smoke else "gpu",
           "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version()}
    return env


COMPILE_ON_CPU = "torch.compile takes minutes on a CPU (tests/test_performance.py runs it)"


def train_rows(c: Check, compiled: bool) -> list[tuple]:
    rows = []
    for bf16 in (True, False):
        for method, policy in TRAIN_ROWS:
            if compiled and policy == "arrow":
                continue
            name = (f"train {method}{f' store {policy}' if policy else ''} bf16 {'on' if bf16 else 'off'}"
                    f"{' compiled' if compiled else ''}")
            rows.append((name, partial(train_case, c, name, method, policy, bf16, compiled),
                         "compile" if compiled else "train", bf16, COMPILE_ON_CPU if compiled else None))
    return rows


def cases(c: Check) -> list[tuple]:
    """(name, function, limit key, CUDA only, why --cpu-smoke skips it), in the order they run: the eager
    training rows, resuming, one compiled row, the measurements, then the other compiled rows (minutes of
    compiling each: the first to fall to the budget)."""
    compiled = train_rows(c, compiled=True)
    peer = [(f"throughput: {who}, bench_peer network, {'bf16' if bf16 else 'fp32'}", partial(fn, c, bf16), "loop",
             bf16, None) for bf16 in (False, True) for who, fn in (("authors' step", authors_case),
                                                                   ("dddm loop", dddm_peer_case))]
    return [*train_rows(c, compiled=False),
            ("resume after kill -9", partial(resume_case, c), "resume", False, None),
            compiled[0],
            ("bf16 matmul peak", partial(peak_case, c), "peak", True, None),
            ("throughput: dddm loop, paper CIFAR-10 network, bf16", partial(paper_case, c), "loop", False, None),
            *peer,
            ("store: dddm loop step, ImageNet-64 network, bf16", partial(imagenet_step_case, c), "loop", False, None),
            *[(f"store: ImageNet-64 per-rank store {where}", partial(store_case, c, backend), "store", False, None)
              for backend, where in (("device", "on the device"), ("arrow", "spilled to Arrow"))],
            *compiled[1:]]


def table(rows: list[dict]) -> str:
    width = max(len(r["case"]) for r in rows)
    lines = [f"{'case':{width}s}  {'s':>6s}  status / figures", "-" * (width + 40)]
    for r in rows:
        figures = {k: v for k, v in r.items() if k not in ("case", "status", "seconds")}
        lines.append(f"{r['case']:{width}s}  {r['seconds']:6.1f}  {r['status']}  {shown(figures)}".rstrip())
    return "\n".join(lines)


def main(installed: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out" / "gpu_check")),
                    help="where gpu_check.json and gpu_check.log go (default: $OUT)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every case at its smallest size, on the CPU")
    ap.add_argument("--budget", type=float, help="seconds after which no case starts (default: 420; smoke 240)")
    ap.add_argument("--peer-dir", type=Path, default=WHEELS / "peer", help="checkout of TheLuoFengLab/DDDM")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=args.out / "gpu_check.log", filemode="w", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    env = environment(args.cpu_smoke, installed, args.peer_dir)
    print(shown(env), flush=True)
    budget = args.budget or (240 if args.cpu_smoke else 420)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        c = Check(args.out, Path(work), args.cpu_smoke, budget, args.peer_dir, env)
        for name, fn, limit, cuda_only, smoke_skip in cases(c):
            c.run(name, fn, limit, cuda_only, smoke_skip)
    print("\n" + table(c.rows), flush=True)
    print(f"\n{sum(r['status'] == 'ran' for r in c.rows)} ran, {sum(r['status'].startswith('failed') for r in c.rows)} "
          f"failed, {sum(r['status'].startswith('skipped') for r in c.rows)} skipped in {c.elapsed():.0f} s; "
          f"{args.out / 'gpu_check.json'}", flush=True)


if __name__ == "__main__":
    main(INSTALLED)
