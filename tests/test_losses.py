import math

import pytest
import torch

from dddm.losses import adaptive_weight, l1, l2, metric_fn, pseudo_huber, udddm_loss
from dddm.processes import PAPER_HUBER_C

PAPER_C = PAPER_HUBER_C["vp"]


def test_adaptive_weight():
    assert adaptive_weight(0) == 1.0
    for n in (1, 2, 9, 99):
        assert adaptive_weight(n) == pytest.approx(1 / (n + 1))
    with pytest.raises(ValueError, match="^n"):
        adaptive_weight(-1)


def test_pseudo_huber_closed_form_over_the_whole_sample():
    x, y = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    c = 0.3
    expected = torch.tensor([math.sqrt(((x[i] - y[i]) ** 2).sum().item() + c * c) - c for i in range(5)])
    assert torch.allclose(pseudo_huber(x, y, c), expected, rtol=1e-5)


def test_pseudo_huber_limits():
    c = 0.00014
    y = torch.zeros(1, 1, 8, 8)
    small = torch.full_like(y, 1e-7)  # ||x-y|| = 8e-7 << c: quadratic regime
    norm_small = 8e-7
    assert pseudo_huber(small, y, c).item() == pytest.approx(norm_small**2 / (2 * c), rel=1e-2)
    big = torch.full_like(y, 0.5)  # ||x-y|| = 4 >> c: linear regime
    assert pseudo_huber(big, y, c).item() == pytest.approx(4.0, rel=1e-3)
    assert pseudo_huber(y, y, c).item() == 0.0


def test_l2_l1_and_metric_lookup():
    x, y = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    x[1] *= 3
    assert torch.allclose(l2(x, y), torch.tensor([1.0, 9.0]))
    assert torch.allclose(l1(x, y), torch.tensor([1.0, 3.0]))
    assert torch.allclose(metric_fn("pseudo_huber", 0.1)(x, y), pseudo_huber(x, y, 0.1))
    with pytest.raises(ValueError, match="^metric"):
        metric_fn("lpips", 0.1)
    with pytest.raises(ValueError, match="^huber_c"):
        metric_fn("pseudo_huber", 0.0)


def test_adaptive_loss_combines_guide_and_iterative_terms():
    pred, x0, est = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    d = metric_fn("l2", 0.0)
    t0 = udddm_loss(pred, x0, est, 0, d)
    assert t0.weight == 1.0
    assert torch.allclose(t0.total, d(pred, x0).mean())  # only the guide term at n = 0
    t3 = udddm_loss(pred, x0, est, 3, d)
    assert torch.allclose(t3.guide, d(pred, x0).mean())
    assert torch.allclose(t3.iterative, d(pred, est).mean())
    assert torch.allclose(t3.total, 0.25 * t3.guide + 0.75 * t3.iterative)


def _minimise_prediction(x0, est, epoch, d, steps=1000):
    """The prediction p that minimises L(p) = w d(p, x0) + (1 - w) d(p, est) for one sample,
    found by gradient descent from the midpoint: what a network that fits perfectly would output.
    (Every case below is within the tolerance from step 530 on and stays there.)"""
    p = ((x0 + est) / 2).clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        udddm_loss(p, x0, est, epoch, d).total.backward()
        opt.step()
    return p.detach()


def test_with_a_norm_metric_the_loss_optimum_is_the_previous_estimate_from_epoch_two_on():
    """Why the paper's schedule gives one mean image on the digits (README, 'The embedded default'):
    d is a norm (pseudo-Huber with the paper's c), so for w = 1/(n+1) <= 1/2 the triangle
    inequality gives w d(p, x0) + (1 - w) d(p, est) >= w d(x0, est) = L(est): the per-sample optimum
    is to copy the estimate, not to move towards the data. At n = 0 it is the data."""
    torch.manual_seed(0)
    x0, est = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    d = metric_fn("pseudo_huber", PAPER_C)
    assert torch.allclose(_minimise_prediction(x0, est, 0, d), x0, atol=0.02)
    for epoch in (2, 5):
        assert torch.allclose(_minimise_prediction(x0, est, epoch, d), est, atol=0.02)
    # and no prediction anywhere beats the copy
    w = adaptive_weight(2)
    copy_loss = udddm_loss(est, x0, est, 2, d).total
    for _ in range(200):
        p = est + torch.randn_like(est) * torch.rand(1) + torch.rand(1) * (x0 - est)
        assert udddm_loss(p, x0, est, 2, d).total >= copy_loss - 1e-4
    assert copy_loss.item() == pytest.approx(w * d(x0, est).item(), rel=1e-5)


def test_with_the_squared_l2_metric_the_loss_optimum_moves_a_fraction_w_towards_the_data():
    torch.manual_seed(1)
    x0, est = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    d = metric_fn("l2", 0.0)
    for epoch in (0, 1, 4):
        w = adaptive_weight(epoch)
        assert torch.allclose(_minimise_prediction(x0, est, epoch, d), w * x0 + (1 - w) * est, atol=0.02)
