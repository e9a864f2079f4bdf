"""Runs dddm.training.train with a params file, as a user's process would (plain python or torchrun),
and saves what the tests compare: each rank's weights, EMA and store estimates.

usage: train_worker.py PARAMS PREPARED OUT_DIR RUN_DIR [METHOD]
"""

import sys
from pathlib import Path

import torch

from dddm import distributed
from dddm.config import load_config
from dddm.training import train


def main() -> None:
    params, prepared, out_dir, run_dir = sys.argv[1:5]
    method = sys.argv[5] if len(sys.argv) > 5 else "udddm"
    cfg = load_config(params)
    result = train(cfg, method, prepared, out_dir, run_dir, progress=False)
    world = distributed.init(cfg.train.device)
    torch.save({"net": result.net.state_dict(), "ema": result.ema.state_dict(),
                "estimates": result.store.estimates() if result.store is not None else None,
                "step": result.global_step},
               Path(out_dir) / f"final-rank{world.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main()
