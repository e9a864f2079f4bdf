"""Speed options of the training loop: precision, optimizer kernel and torch.compile.

Each default is the one measured best on CPU (bench/bench_options.py, bench/bench_peer.py;
README, "Speed against the authors' code"):
- bf16 autocast: on CUDA with `train.bf16`; on CPU only with `train.cpu_bf16` and a CPU with
  native bf16 (AMX / avx512_bf16, as oneDNN reports it). On such a CPU it pays at CIFAR-size
  widths (2x at 64 channels) but not at the embedded default's (1.05x, within noise), and it
  moves results at bf16 precision, so it is off by default;
- Adam with the fused kernel (one pass over all parameters; 3x the for-loop kernel on CPU; the
  same results to float rounding);
- `train.compile`: torch.compile of the network; off by default (1.13x per step at the default
  config on CPU, less than the minute and a half or more of compiling saves).
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """oneDNN can run bf16 convolutions and matmuls natively (not emulated in fp32)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_autocast(device: torch.device, cuda_bf16: bool, cpu_bf16: bool) -> torch.autocast:
    """The autocast context for the forward pass on `device` (disabled: fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda_bf16)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cpu_bf16 and cpu_has_native_bf16())


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where PyTorch has one for `device` (CPU and CUDA)."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile(model) when enabled. The compiled module shares the parameters, so the
    optimizer, EMA and checkpoints keep using the plain network."""
    return torch.compile(model) if enabled else model
