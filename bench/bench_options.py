"""The speed options of dddm/performance.py (uDDDM) against the kernels used before them, at the default
config (params.yaml) or the issue's CIFAR-size network: step speed and how far the results move.

    python bench/bench_options.py [--epochs 2] [--rounds 9] [--config default|cifar] [--compile]

"before" runs attention on the math path (with its safe-softmax masking) and Adam with the
for-loop kernel, as the code did before these options. Speed: one training step (forward, loss,
backward, optimizer) per variant and round, interleaved, medians. Agreement: each variant trains
from scratch with the real loop (dddm.training.train, one process) on the embedded digits;
reported are the final loss, the weights' distance from "before"'s relative to how far "before"
moved them from their initial values, and the largest difference of 64 one-step samples (EMA
model) in [-1, 1].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_peer import time_interleaved  # noqa: E402
from dddm import performance  # noqa: E402
from dddm.config import merge_params, parse_config  # noqa: E402
from dddm.data import PreparedDataset, prepare_dataset  # noqa: E402
from dddm.methods import Progress  # noqa: E402
from dddm.sampling import sample  # noqa: E402
from dddm.training import train  # noqa: E402
from dddm.unet import build_network  # noqa: E402

# The CIFAR-size network (bench/bench_peer.py's), on digits resized to 32x32.
CIFAR_SIZE = {"data": {"image_size": 32}, "model": {"base_channels": 64, "channel_mult": [1, 2, 2], "num_blocks": 2,
                                                    "attn_resolutions": [16], "dropout": 0.0}}


@contextlib.contextmanager
def kernels_before():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = performance.adam
    performance.adam = lambda params, lr, device: torch.optim.Adam(params, lr=lr, foreach=False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        performance.adam = fused


def step_closure(params: dict, prepared: Path, before: bool):
    """One training step of the loop's work (no store, EMA or logging), with the variant's options."""
    cfg = parse_config(params)
    data = PreparedDataset(prepared)
    idx = torch.arange(cfg.train.batch_size)
    x0, est = data.images(idx), torch.randn(len(idx), 1, cfg.data.image_size, cfg.data.image_size)
    method = cfg.make_method("udddm")
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.model, cfg.data.image_size, 1, method.conditioning)
    with kernels_before() if before else contextlib.nullcontext():
        opt = performance.adam(net.parameters(), cfg.train.lr, torch.device("cpu"))
    model = performance.maybe_compile(net, cfg.train.compile)
    autocast = performance.bf16_autocast(torch.device("cpu"), cfg.train.bf16, cfg.train.cpu_bf16)

    def step():
        with kernels_before() if before else contextlib.nullcontext():
            with autocast:
                out = method.loss(model, x0, idx, Progress(1, 0, 1), est)
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()

    return step


def run(tmp: Path, name: str, params: dict, prepared: Path, before: bool) -> dict:
    cfg = parse_config(merge_params(params, {"train": {"checkpoint_dir": str(tmp / name / "ck")}}))
    with kernels_before() if before else contextlib.nullcontext():
        result = train(cfg, "udddm", prepared, tmp / name / "out", tmp / name / "run", progress=False)
    rows = [json.loads(line) for line in result.history_path.read_text().splitlines()]
    samples = sample(cfg.make_method("udddm"), result.ema.module, 64, (1, cfg.data.image_size, cfg.data.image_size),
                     steps=1, batch_size=64)
    return {"loss": rows[-1]["loss"],
            "weights": torch.cat([p.detach().flatten() for p in result.net.parameters()]), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--config", choices=["default", "cifar"], default="default")
    ap.add_argument("--compile", action="store_true", help="also time train.compile (minutes of compiling)")
    args = ap.parse_args()

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = merge_params(base, {"train": {"epochs": args.epochs, "checkpoint_every": 0, "resume": "never"},
                               "tracking": {"grid_every_epochs": 0}})
    if args.config == "cifar":
        base = merge_params(base, CIFAR_SIZE)
    variants = {"before: math attention, for-loop Adam": ({}, True), "defaults": ({}, False),
                "train.cpu_bf16": ({"cpu_bf16": True}, False)}
    if args.compile:
        variants["train.compile"] = ({"compile": True}, False)
    cfg = parse_config(base)
    torch.manual_seed(cfg.seed)
    init = torch.cat([p.detach().flatten() for p in build_network(
        cfg.model, cfg.data.image_size, 1, cfg.make_method("udddm").conditioning).parameters()])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = tmp / "prepared.arrow"
        prepare_dataset("digits", None, cfg.data.image_size, prepared, progress=False)
        step_s = time_interleaved({name: step_closure(merge_params(base, {"train": options}), prepared, before)
                                   for name, (options, before) in variants.items()}, args.rounds, warmup=2)
        results = {name: run(tmp, f"v{i}", merge_params(base, {"train": options}), prepared, before)
                   for i, (name, (options, before)) in enumerate(variants.items()) if name != "train.compile"}
    ref = results["before: math attention, for-loop Adam"]  # train.compile: timed only (minutes per run)
    moved = (ref["weights"] - init).norm()
    print(f"\n{args.config} config ({cfg.model.base_channels} channels, {cfg.data.image_size}px, batch "
          f"{cfg.train.batch_size}), {args.epochs} epochs, {torch.get_num_threads()} thread(s), "
          f"native CPU bf16: {performance.cpu_has_native_bf16()}")
    header = (f"{'variant':40s} {'step ms':>8s} {'img/s':>7s} {'vs before':>9s} {'final loss':>11s} "
              f"{'weights moved':>13s} {'max |sample diff|':>17s}")
    print(header)
    print("-" * len(header))
    before = "before: math attention, for-loop Adam"
    for name, seconds in step_s.items():
        agreement = ""
        if name in results:
            r = results[name]
            agreement = (f"{r['loss']:11.5f} {((r['weights'] - ref['weights']).norm() / moved).item():13.2e} "
                         f"{(r['samples'] - ref['samples']).abs().max().item():17.2e}")
        print(f"{name:40s} {1000 * seconds:8.1f} {cfg.train.batch_size / seconds:7.1f} "
              f"{step_s[before] / seconds:8.2f}x {agreement}")
    print("weights moved: |w - w_before| / |w_before - w_init| after the last step")


if __name__ == "__main__":
    main()
