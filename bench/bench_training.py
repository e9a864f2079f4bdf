"""Training throughput of uDDDM at the default config (params.yaml): one process vs two-process DDP (gloo),
device vs Arrow x0 store, with the share of step time per phase.

    python bench/bench_training.py [--epochs 2] [--threads 1]

Each variant trains from scratch with the real loop (dddm.training.train, launched by torchrun
for two processes) on the prepared embedded dataset; figures are medians over the steps after the
first epoch's warm-up, all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dddm.distributed import torchrun_command  # noqa: E402
from dddm.training import PHASES  # noqa: E402


def worker(params: str, method: str, prepared: str, out: str, run_dir: str) -> None:
    from dddm import distributed
    from dddm.config import load_config
    from dddm.training import train

    train(load_config(params), method, prepared, out, run_dir, progress=False)
    distributed.shutdown()


def write_variant(tmp: Path, name: str, params: dict) -> Path:
    """A work directory with the variant's params.yaml (checkpoints inside it)."""
    work = tmp / name
    work.mkdir()
    params = json.loads(json.dumps(params))
    params["train"]["checkpoint_dir"] = str(work / "ck")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def worker_command(work: Path, method: str, prepared: Path, nproc: int) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else torchrun_command(nproc)
    return [*launcher, str(Path(__file__).resolve()), "--worker", str(work / "params.yaml"), method, str(prepared),
            str(work / "out"), str(work / "run")]


def step_figures(rows: list[dict]) -> dict:
    """Median img/s and each phase's median share of the median step, over history rows."""
    step_time = statistics.median(sum(r[f"time_{p}"] for p in PHASES) for r in rows)
    shares = {p: statistics.median(r[f"time_{p}"] for r in rows) / step_time for p in PHASES}
    return {"img_per_s": statistics.median(r["img_per_s"] for r in rows), "step_s": step_time, **shares}


def run_variant(tmp: Path, name: str, params: dict, prepared: Path, nproc: int, threads: int) -> dict:
    work = write_variant(tmp, name, params)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    subprocess.run(worker_command(work, "udddm", prepared, nproc), check=True, env=env)
    rows = [json.loads(line) for line in (work / "run" / "history.jsonl").read_text().splitlines()]
    first_epoch = rows[0]["epoch"]
    return {"variant": name, **step_figures([r for r in rows if r["epoch"] > first_epoch] or rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)

    from dddm.config import load_config
    from dddm.data import prepare_dataset

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["train"].update(epochs=args.epochs, checkpoint_every=0, eval_every=0)  # the worker passes no learning curve
    base["tracking"]["grid_every_epochs"] = 0
    load_config(ROOT / "params.yaml")  # the defaults are valid
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = tmp / "prepared.arrow"
        prepare_dataset(base["data"]["source"], base["data"]["path"], base["data"]["image_size"], prepared,
                        progress=False)
        variants = [("1 process, device store", 1, "device"), ("1 process, Arrow store", 1, "arrow"),
                    ("2 gloo processes, device store", 2, "device"), ("2 gloo processes, Arrow store", 2, "arrow")]
        results = []
        for name, nproc, policy in variants:
            params = json.loads(json.dumps(base))
            params["methods"] = ["udddm"]
            params["method"]["udddm"]["store"]["policy"] = policy
            results.append(run_variant(tmp, name.replace(" ", "_").replace(",", ""), params, prepared, nproc,
                                       args.threads))
            results[-1]["variant"] = name
    baseline = results[0]["img_per_s"]
    print(f"\nper-process batch {base['train']['batch_size']}, image {base['data']['image_size']}px, "
          f"{args.threads} thread(s) per process, medians over steps after epoch 0")
    header = f"{'variant':34s} {'img/s':>8s} {'vs 1p':>6s} " + " ".join(f"{p:>9s}" for p in PHASES)
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['variant']:34s} {r['img_per_s']:8.0f} {r['img_per_s'] / baseline:6.2f} "
              + " ".join(f"{100 * r[p]:8.1f}%" for p in PHASES))


if __name__ == "__main__":
    main()
