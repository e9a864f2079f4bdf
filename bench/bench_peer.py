"""Training-step and 1-step-sampling speed against the authors' code (TheLuoFengLab/DDDM) at one
identical network, interleaved A/B rounds in one run.

    python bench/bench_peer.py --peer-dir /tmp/peer [--rounds 7] [--batch 32] [--threads 1]

`--peer-dir` is a checkout of the authors' repository (the directory holding their `DDDM/`
package); nothing of it is copied here. The network is the one both code bases can build alike:
3x32x32, 64 channels, multipliers (1, 2, 2), 2 residual blocks per stage, attention at 16x16,
4 heads, no dropout, the estimate concatenated with x_t at the input (their cross-attention
network differs from ours in size, so it gives no like-for-like figure). Parameter counts are
printed for both.

A training step, for each code base as its training loop runs it: noise, forward, its loss
(ours: the uDDDM pseudo-Huber terms; theirs: their default MSE terms, `training_losses`),
backward, optimizer step (ours: fused Adam; theirs: AdamW), EMA update, estimate write.
Sampling: one network evaluation at t = T from noise; their `p_sample_loop` passes its
arguments in the wrong order, so their network is called directly as `p_sample` would.
Variants: each code base in fp32 (as both run by default on CPU) and under bf16 autocast (ours:
`train.cpu_bf16`; theirs: the same torch.autocast around their step, which their code does not
offer, to show what autocast alone gives). Figures: medians over rounds, ratios against the
authors' fp32 row, all from this one run.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dddm.config import merge_params, parse_config  # noqa: E402
from dddm.methods import Progress  # noqa: E402
from dddm.performance import adam, bf16_autocast, cpu_has_native_bf16  # noqa: E402
from dddm.unet import UNet  # noqa: E402

SIZE, CHANNELS, WIDTH, MULT, BLOCKS, ATTN, HEADS = 32, 3, 64, (1, 2, 2), 2, 16, 4
T, BETA_MIN, BETA_MAX, LR, EMA = 1000, 1.5e-3, 2.0e-2, 2e-4, 0.9999
EPOCH = 1  # w = 1/2: both loss terms count


def _stub_if_missing(name: str) -> None:
    """Their package imports einops (cross-attention) and piq (Pseudo-LPIPS) at module level;
    neither is used by the concat network and MSE loss timed here. Absent ones are stubbed with
    names that raise if called."""
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)

        def missing(attr: str):
            if attr.startswith("__"):  # module introspection (inspect, torch) must see a plain module
                raise AttributeError(attr)

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"{name}.{attr}: not installed; bench_peer stubs it, the timed code never calls it")
            return unavailable

        module.__getattr__ = missing
        sys.modules[name] = module


def load_peer(peer_dir: Path):
    if not (peer_dir / "DDDM" / "unet.py").is_file():
        raise SystemExit(f"--peer-dir: {peer_dir} has no DDDM/unet.py (a checkout of TheLuoFengLab/DDDM)")
    for name in ("einops", "piq"):
        _stub_if_missing(name)
    sys.path.insert(0, str(peer_dir))
    return (importlib.import_module("DDDM.unet"), importlib.import_module("DDDM.gaussian_diffusion"),
            importlib.import_module("DDDM.nn"))


class PeerConcat(torch.nn.Module):
    """Their network takes the 6-channel concatenation; their training_losses calls model(x_t, t, context=...)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_t, t, context):
        return self.net(torch.cat([x_t, context], dim=1), t)


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def udddm_vp():
    """The project's uDDDM with the VP process at the authors' T and betas, concat conditioning."""
    params = merge_params(yaml.safe_load((ROOT / "params.yaml").read_text()), {"method": {"udddm": {
        "process": "vp", "processes": {"vp": {"T": T, "beta_min": BETA_MIN, "beta_max": BETA_MAX}},
        "conditioning": "concat", "metric": "pseudo_huber", "huber_c": None}}})
    return parse_config(params, "bench_peer").make_method("udddm")


def project_variant(batch: int, bf16: bool):
    torch.manual_seed(0)
    net = UNet(SIZE, CHANNELS, WIDTH, MULT, BLOCKS, (ATTN,), 0.0, HEADS, "concat")
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(EMA), use_buffers=True)
    opt = adam(net.parameters(), LR, torch.device("cpu"))
    method = udddm_vp()
    autocast = bf16_autocast(torch.device("cpu"), cuda_bf16=False, cpu_bf16=bf16)
    x0, estimates = torch.rand(batch, CHANNELS, SIZE, SIZE) * 2 - 1, torch.randn(batch, CHANNELS, SIZE, SIZE)
    idx = torch.arange(batch)

    def step():
        net.train()
        with autocast:
            out = method.loss(net, x0, idx, Progress(EPOCH, 0, 1), estimates[idx])
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        ema.update_parameters(net)
        estimates[idx] = out.new_estimates.float()

    def sample():
        net.eval()
        with torch.inference_mode(), autocast:  # as dddm.sampling runs a method's sampler
            method.iterate(net, torch.randn_like(x0), method.process.prior(torch.randn_like(x0)), 1).clamp(-1, 1)

    return net, step, sample


def peer_variant(peer, batch: int, bf16: bool):
    unet, gd, nn_util = peer
    torch.manual_seed(0)
    net = unet.UNetModel(in_channels=2 * CHANNELS, model_channels=WIDTH, out_channels=CHANNELS,
                         num_res_blocks=BLOCKS, attention_resolutions=(SIZE // ATTN,), dropout=0.0,
                         channel_mult=MULT, num_heads=HEADS, use_scale_shift_norm=True, use_CA=False)
    model = PeerConcat(net)
    params = list(net.parameters())
    ema_params = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    diffusion = gd.VP_Diffusion(gd.get_named_beta_schedule("linear", T, BETA_MIN, BETA_MAX), gd.LossType.MSE)
    autocast = bf16_autocast(torch.device("cpu"), cuda_bf16=False, cpu_bf16=bf16)
    x0 = torch.rand(batch, CHANNELS, SIZE, SIZE) * 2 - 1
    idx = torch.arange(batch)
    w = 1 / (EPOCH + 1)

    def step():  # their forward_backward + optimize_normal, one micro-batch
        net.train()
        condition = net.x_bar[idx].detach()
        t = torch.randint(0, T, (batch,))
        with autocast:
            terms, _ = diffusion.training_losses(model, x0, t, idx, condition)
            loss = (w * terms["guide"] + (1 - w) * terms["iter"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        nn_util.update_ema(ema_params, params, rate=EMA)
        net.x_bar[idx] = x0  # their update_xbar, without the all-gather of a world of one

    def sample():  # their p_sample with the arguments in the right order
        net.eval()
        x_T, x_bar = torch.randn_like(x0), torch.randn_like(x0)
        with torch.no_grad(), autocast:
            (x_T - model(x_T, torch.full((batch,), T), context=x_bar)).clamp(-1, 1)

    return net, step, sample


def time_interleaved(fns: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call; each round runs every variant once, in a rotating order."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-dir", type=Path, required=True, help="checkout of TheLuoFengLab/DDDM")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = load_peer(args.peer_dir.resolve())

    precisions = [False, True] if cpu_has_native_bf16() else [False]
    variants = {}
    for bf16 in precisions:
        suffix = ", bf16 autocast" if bf16 else ", fp32"
        variants["authors' code" + suffix] = peer_variant(peer, args.batch, bf16)
        variants["this project" + suffix] = project_variant(args.batch, bf16)
    params = {name: count(net) for name, (net, _, _) in variants.items()}
    train_s = time_interleaved({name: step for name, (_, step, _) in variants.items()}, args.rounds, args.warmup)
    for name, (net, _, _) in variants.items():  # sampling at its own batch size
        variants[name] = (peer_variant(peer, args.sample_batch, "bf16" in name) if name.startswith("authors")
                          else project_variant(args.sample_batch, "bf16" in name))
    sample_s = time_interleaved({name: sample for name, (_, _, sample) in variants.items()}, args.rounds, args.warmup)

    base = "authors' code, fp32"
    print(f"\n{SIZE}x{SIZE}x{CHANNELS}, {WIDTH} channels, mult {MULT}, {BLOCKS} blocks, attention at {ATTN}, "
          f"concat conditioning; training batch {args.batch}, sampling batch {args.sample_batch}; "
          f"{args.threads} thread(s); medians of {args.rounds} interleaved rounds; torch {torch.__version__}")
    header = (f"{'variant':34s} {'params':>10s} {'train ms':>9s} {'img/s':>7s} {'vs authors':>10s} "
              f"{'1-step ms':>9s} {'img/s':>7s} {'vs authors':>10s}")
    print(header)
    print("-" * len(header))
    for name in variants:
        print(f"{name:34s} {params[name]:10,d} {1000 * train_s[name]:9.1f} {args.batch / train_s[name]:7.1f} "
              f"{train_s[base] / train_s[name]:9.2f}x {1000 * sample_s[name]:9.1f} "
              f"{args.sample_batch / sample_s[name]:7.1f} {sample_s[base] / sample_s[name]:9.2f}x")


if __name__ == "__main__":
    main()
