"""The compute a preset's training step costs per image, for on-paper throughput (README, "On paper").

Counts the FLOPs of one uDDDM loss, forward and backward, with torch's FlopCounterMode on CPU (a count,
not a timing), and the network's parameters; prints img/s per GPU at an assumed share of bf16 peak.

    python bench/count_flops.py presets/imagenet64-vp.yaml --utilization 0.4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dddm.config import merge_params, parse_config  # noqa: E402
from dddm.methods import Progress  # noqa: E402
from dddm.unet import build_network  # noqa: E402

BF16_PEAK = {"A100": 312e12, "H100": 989e12}  # dense bf16 FLOP/s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path)
    ap.add_argument("--method", default="udddm")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--utilization", type=float, default=0.4, help="assumed share of the bf16 peak")
    args = ap.parse_args()
    raw = merge_params(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(args.preset.read_text()))
    raw["data"]["path"] = raw["data"]["path"] or "unused"
    cfg = parse_config(raw)
    method = cfg.make_method(args.method)
    size, channels = cfg.data.image_size, 1 if cfg.data.source == "digits" else 3
    net = build_network(cfg.model, size, channels, method.conditioning)
    x0 = torch.randn(args.batch, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        out = method.loss(net, x0, torch.arange(args.batch), Progress(1, 10, 0), torch.randn_like(x0))
        out.total.backward()
    per_image = counter.get_total_flops() / args.batch
    print(f"{args.preset.name}: {sum(p.numel() for p in net.parameters()):,} parameters, "
          f"{per_image:.3g} training FLOPs per image")
    for gpu, peak in BF16_PEAK.items():
        print(f"  {gpu}: {args.utilization * peak / per_image:.0f} img/s per GPU at {args.utilization:.0%} of bf16 peak")


if __name__ == "__main__":
    main()
