"""Stage sample: the EMA model -> out/samples/<s>-step.npz (uint8) and a PNG grid per step count,
the grids also logged to the training run in MLflow."""

from pathlib import Path

import numpy as np

from dddm.checkpoint import load_model
from dddm.distributed import resolve_device
from dddm.pixels import to_uint8
from dddm.sampling import sample
from dddm.tracking import RunLogger

from .common import start

MODEL = Path("out/train/model.pt")
RUN = Path("out/train/mlflow_run.json")
OUT = Path("out/samples")


def main() -> None:
    cfg = start("sample")
    device = resolve_device(cfg.train.device)
    net, train_cfg, info = load_model(MODEL, device)
    run = RunLogger(RUN)
    diffusion = train_cfg.make_diffusion()
    shape = (info["channels"], info["image_size"], info["image_size"])
    OUT.mkdir(parents=True, exist_ok=True)
    for steps in cfg.sample.steps:
        images = sample(net, diffusion, cfg.sample.num_samples, shape, steps, cfg.seed,
                        cfg.sample.batch_size, device, progress=True)
        np.savez_compressed(OUT / f"{steps}-step.npz", images=to_uint8(images.cpu()).numpy())
        run.save_grid(images, OUT / f"{steps}-step.png", f"samples/{steps}-step.png")


if __name__ == "__main__":
    main()
