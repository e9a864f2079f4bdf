"""Stage sample: the EMA model -> out/samples/<s>-step.npz and a PNG grid for each step count."""

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from dddm.checkpoint import load_model
from dddm.distributed import resolve_device
from dddm.sampling import sample

from .common import start

MODEL = Path("out/train/model.pt")
OUT = Path("out/samples")


def main() -> None:
    cfg = start("sample")
    device = resolve_device(cfg.train.device)
    net, train_cfg, info = load_model(MODEL, device)
    diffusion = train_cfg.make_diffusion()
    shape = (info["channels"], info["image_size"], info["image_size"])
    OUT.mkdir(parents=True, exist_ok=True)
    for steps in cfg.sample.steps:
        images = sample(net, diffusion, cfg.sample.num_samples, shape, steps, cfg.seed,
                        cfg.sample.batch_size, device, progress=True)
        as_uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        np.savez_compressed(OUT / f"{steps}-step.npz", images=as_uint8)
        grid = images[:64]
        save_image((grid + 1) / 2, OUT / f"{steps}-step.png", nrow=8, padding=1)


if __name__ == "__main__":
    main()
