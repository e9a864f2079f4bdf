"""What uDDDM's t = T map does with its inputs: the evidence behind the method study.

At t = T, f_theta(x0_est, x_T, T) is the whole one-step sampler. These numbers say whether its output
follows the estimate or the noise x_T, whether it merely copies the estimate, and what repeated
application (Algorithm 2 with s = 1, 2, 4, 8) does to a sample set. All are per-pixel root mean squares
(or standard deviations) of images in [-1, 1].
"""

from __future__ import annotations

import torch

from .methods import UDDDM
from .rng import STREAM_SAMPLE_ESTIMATE, normal_per_index

SPREAD_STEPS = (1, 2, 4, 8)


def _rms(x: torch.Tensor) -> float:
    return x.float().square().mean().sqrt().item()


@torch.inference_mode()
def t_max_response(method: UDDDM, net, estimates: torch.Tensor, num_priors: int, device) -> dict[str, float]:
    """f(est_j, x_T_i, T) for every pair: the output's spread over the estimates with x_T fixed, over x_T
    with the estimate fixed, and its distance from the estimate it was given."""
    k = len(estimates)
    shape = tuple(estimates.shape[1:])
    _, x_T = method.initial_noise(torch.arange(num_priors), shape, device)
    est = estimates.to(device)
    rows = [method.iterate(net, est, x_T[i:i + 1].expand(k, *shape), 1) for i in range(num_priors)]
    out = torch.stack(rows)  # (prior i, estimate j, C, H, W)
    return {"std_over_estimates": out.std(dim=1).square().mean().sqrt().item(),
            "std_over_priors": out.std(dim=0).square().mean().sqrt().item(),
            "distance_to_estimate": _rms(out - est.unsqueeze(0))}


@torch.inference_mode()
def step_spread(method: UDDDM, net, shape: tuple[int, ...], num: int, device) -> dict[str, dict[str, float]]:
    """For s = 1, 2, 4, 8: the samples' per-pixel spread (their diversity) and how far s steps moved them
    from s / 2 steps."""
    x0_est, x_T = method.initial_noise(torch.arange(num), shape, device)
    out, previous, done = {}, None, 0
    for s in SPREAD_STEPS:
        x0_est = method.iterate(net, x0_est, x_T, s - done)
        done = s
        clipped = x0_est.clamp(-1, 1)
        out[f"s{s}"] = {"spread": clipped.std(dim=0).square().mean().sqrt().item(),
                        "change": _rms(clipped - previous) if previous is not None else float("nan")}
        previous = clipped
    return out


def udddm_diagnostics(method: UDDDM, net, data: torch.Tensor, device, num: int = 16) -> dict:
    """The t = T response to noise estimates (as in sampling) and to data estimates (as in training
    after the first epoch, where the store holds predictions close to the data), and the step spread."""
    shape = tuple(data.shape[1:])
    noise = normal_per_index(torch.arange(num), shape, method.seed, STREAM_SAMPLE_ESTIMATE)
    return {"t_max_noise_estimates": t_max_response(method, net, noise, num, device),
            "t_max_data_estimates": t_max_response(method, net, data[:num], num, device),
            "steps": step_spread(method, net, shape, 4 * num, device)}
