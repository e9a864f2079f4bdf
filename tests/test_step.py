import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dddm.diffusion import Diffusion
from dddm.losses import metric_fn
from dddm.step import training_step
from dddm.unet import UNet


class ShiftNet(torch.nn.Module):
    """F = x0_est + w: the prediction is known in closed form and differs from x0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.25))

    def forward(self, x0_est, x_in, label):
        return x0_est + self.w


def test_new_estimates_are_the_prediction_not_the_data():
    d = Diffusion("ve", 100)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    est = torch.randn(8, 1, 4, 4)
    idx = torch.arange(8)
    out = training_step(ShiftNet(), d, x0, idx, est, epoch=2, metric=metric_fn("l2", 0), seed=0)
    assert not out.new_estimates.requires_grad
    assert not torch.allclose(out.new_estimates, x0)
    # recompute f = kappa x_t + (1 - kappa) F with the same per-index noise
    from dddm.rng import STREAM_TRAIN_NOISE, timestep_and_noise_per_index
    t, eps = timestep_and_noise_per_index(idx, (1, 4, 4), d.T, 0, STREAM_TRAIN_NOISE, 2)
    x_t = d.add_noise(x0, t, eps)
    a, b = d.skip_coefficients(t)
    assert torch.allclose(out.new_estimates, a * x_t + b * (est + 0.25), atol=1e-6)
    assert out.terms.weight == pytest.approx(1 / 3)


def test_noise_depends_on_index_not_on_batch_composition():
    d = Diffusion("vp", 100)
    x0 = torch.zeros(6, 1, 4, 4)
    est = torch.zeros(6, 1, 4, 4)
    idx = torch.tensor([5, 9, 2, 7, 1, 0])
    full = training_step(ShiftNet(), d, x0, idx, est, 0, metric_fn("l2", 0), seed=1).new_estimates
    part = training_step(ShiftNet(), d, x0[3:], idx[3:], est[3:], 0, metric_fn("l2", 0), seed=1).new_estimates
    assert torch.equal(full[3:], part)
    other_epoch = training_step(ShiftNet(), d, x0, idx, est, 1, metric_fn("l2", 0), seed=1).new_estimates
    assert not torch.equal(full, other_epoch)


def _digits(n, size):
    x = torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_learning_works_on_real_digits(kind):
    """A small U-Net's guide loss on 64 real digits falls by at least half within a few hundred
    CPU steps; it would not if gradients failed to flow through f = a x_t + b F."""
    torch.manual_seed(0)
    x0 = _digits(64, 8)
    idx = torch.arange(64)
    net = UNet(image_size=8, channels=1, base_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), dropout=0.0, num_heads=2)
    d = Diffusion(kind, 1000)
    metric = metric_fn("pseudo_huber", 0.00014)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    est = torch.randn_like(x0)

    def guide_loss():  # evaluated on fixed noise so the comparison is fair
        with torch.no_grad():
            return training_step(net, d, x0, idx, est, 0, metric, seed=123).terms.guide.item()

    before = guide_loss()
    for step in range(300):
        out = training_step(net, d, x0, idx, est, 0, metric, seed=step)
        opt.zero_grad()
        out.terms.total.backward()
        opt.step()
    after = guide_loss()
    assert after < 0.5 * before, (before, after)
