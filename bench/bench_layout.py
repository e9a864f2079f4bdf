"""Two speed options of issue 14 that the project does not use, measured: channels_last memory format
for training and sampling, and torch.compile for 1-step sampling (uDDDM, the default or the CIFAR-size
network; interleaved rounds, medians; the ratio is against the default contiguous, eager network).

    python bench/bench_layout.py [--config default|cifar] [--rounds 9] [--compile-sampling]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_options import CIFAR_SIZE  # noqa: E402
from bench_peer import time_interleaved  # noqa: E402
from dddm import performance  # noqa: E402
from dddm.config import merge_params, parse_config  # noqa: E402
from dddm.data import PreparedDataset, prepare_dataset  # noqa: E402
from dddm.methods import Progress  # noqa: E402
from dddm.unet import build_network  # noqa: E402


def variants(cfg, prepared: Path, compile_sampling: bool) -> tuple[dict, dict]:
    """({name: one training step}, {name: one 1-step sampling batch}) per memory format."""
    data = PreparedDataset(prepared)
    idx = torch.arange(cfg.train.batch_size)
    method = cfg.make_method("udddm")
    side = cfg.data.image_size
    train_steps, samplers = {}, {}
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.model, side, 1, method.conditioning).to(memory_format=layout)
        opt = performance.adam(net.parameters(), cfg.train.lr, torch.device("cpu"))
        x0 = data.images(idx).contiguous(memory_format=layout)
        est = torch.randn(len(idx), 1, side, side).contiguous(memory_format=layout)
        name = "channels_last" if layout is torch.channels_last else "contiguous (default)"

        def step(net=net, opt=opt, x0=x0, est=est):
            out = method.loss(net, x0, idx, Progress(1, 0, 1), est)
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()

        x_t = torch.randn(64, 1, side, side).contiguous(memory_format=layout)
        label = torch.full((64,), 0.5)

        def one_step(net=net, x_t=x_t):
            with torch.inference_mode():
                net(x_t, x_t, label)

        train_steps[name], samplers[name] = step, one_step
        if compile_sampling and layout is torch.contiguous_format:
            compiled = torch.compile(net)

            def compiled_step(x_t=x_t):
                with torch.inference_mode():
                    compiled(x_t, x_t, label)

            compiled_step()  # compiling is not timed
            samplers["torch.compile"] = compiled_step
    return train_steps, samplers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["default", "cifar"], default="default")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--compile-sampling", action="store_true")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = parse_config(merge_params(base, CIFAR_SIZE) if args.config == "cifar" else base)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.arrow"
        prepare_dataset("digits", None, cfg.data.image_size, prepared, progress=False)
        train_steps, samplers = variants(cfg, prepared, args.compile_sampling)
        train_s = time_interleaved(train_steps, args.rounds, warmup=2)
        sample_s = time_interleaved(samplers, args.rounds, warmup=2)
    print(f"\n{args.config} config ({cfg.model.base_channels} channels, {cfg.data.image_size}px), "
          f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds")
    for title, times, batch in (("training step", train_s, cfg.train.batch_size), ("1-step sampling", sample_s, 64)):
        reference = times["contiguous (default)"]
        print(f"{title} (batch {batch}):")
        for name, seconds in times.items():
            print(f"  {name:24s} {1000 * seconds:9.1f} ms  {reference / seconds:5.2f}x")


if __name__ == "__main__":
    main()
