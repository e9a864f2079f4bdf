import math

import pytest
import torch

from dddm.processes import PROCESSES, VE, VP, karras_sigmas, vp_alpha_bar


def test_vp_schedule_end_points_and_formula():
    ab = vp_alpha_bar(8000, 1.5e-3, 2.0e-2)
    assert ab.shape == (8000,)
    assert ab[0].item() == pytest.approx(1 - 1.5e-3, rel=1e-12)
    betas = torch.linspace(1.5e-3, 2.0e-2, 8000, dtype=torch.float64)
    assert betas[-1].item() == pytest.approx(2.0e-2)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), checked at an interior t by a log-sum.
    assert ab[4999].item() == pytest.approx(math.exp(torch.log1p(-betas[:5000]).sum().item()), rel=1e-9)
    assert torch.all(ab[1:] < ab[:-1])


@pytest.mark.parametrize("rho", [1.0, 7.0, 3.5])
def test_ve_karras_schedule_end_points_and_formula(rho):
    s = karras_sigmas(1000, 0.01, 50.0, rho)
    assert s[0].item() == pytest.approx(0.01, rel=1e-12)
    assert s[-1].item() == pytest.approx(50.0, rel=1e-12)
    t = 400  # 1-based
    lo, hi = 0.01 ** (1 / rho), 50.0 ** (1 / rho)
    assert s[t - 1].item() == pytest.approx((lo + (t - 1) / 999 * (hi - lo)) ** rho, rel=1e-12)


def test_ve_geometric_is_the_rho_to_infinity_limit():
    geo = karras_sigmas(100, 0.01, 50.0, math.inf)
    ratios = geo[1:] / geo[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-10)
    assert geo[0].item() == pytest.approx(0.01) and geo[-1].item() == pytest.approx(50.0)
    assert torch.allclose(karras_sigmas(100, 0.01, 50.0, 1e6), geo, rtol=1e-4)


def test_ve_noise_std_matches_sigma():
    d = VE(VE.Config(T=1000, sigma_min=0.01, sigma_max=50.0, rho=7.0))
    g = torch.Generator().manual_seed(0)
    for t_val in (1, 300, 1000):
        x0 = torch.rand(4000, 1, 4, 4, generator=g) * 2 - 1
        t = torch.full((4000,), t_val)
        eps = torch.randn(x0.shape, generator=g)
        diff = d.add_noise(x0, t, eps) - x0
        sigma = d.sigma(t)[0].item()
        assert diff.std().item() == pytest.approx(sigma, rel=0.02)  # sigma, not sigma^2
        assert diff.mean().item() == pytest.approx(0.0, abs=0.05 * sigma)


def test_vp_noised_moments_match_alpha_bar():
    d = VP(VP.Config(T=8000, beta_min=1.5e-3, beta_max=2.0e-2))
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000, 1, 2, 2), 0.7)
    for t_val in (1, 2000, 8000):
        t = torch.full((20000,), t_val)
        x_t = d.add_noise(x0, t, torch.randn(x0.shape, generator=g))
        ab = d.alpha_bar(t)[0].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-4)


def vp(T=100):
    return VP(VP.Config(T=T, beta_min=1.5e-3, beta_max=2.0e-2))


def ve(T=100, sigma_max=50.0):
    return VE(VE.Config(T=T, sigma_min=0.01, sigma_max=sigma_max, rho=7.0))


class KnownNet(torch.nn.Module):
    """F returns a fixed tensor and records what it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x0_est, x_in, label):
        self.calls.append((x0_est.clone(), x_in.clone(), label.clone()))
        return self.out


def test_unified_parameterization_vp():
    x_t, est, F = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 50, 100])
    f = vp().denoise(KnownNet(F), est, x_t, t)
    assert torch.allclose(f, x_t - F)


def test_unified_parameterization_ve():
    d = ve()
    x_t, est, F = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 50, 100])
    net = KnownNet(F)
    f = d.denoise(net, est, x_t, t)
    sig = karras_sigmas(100, 0.01, 50.0, 7.0)[t - 1].float().view(-1, 1, 1, 1)
    kappa = 0.01 / sig
    assert torch.allclose(f, kappa * x_t + (1 - kappa) * F, atol=1e-6)
    # boundary condition: at t = 1, sigma = sigma_min, kappa = 1 and f = x_t whatever F says
    assert torch.allclose(f[0], x_t[0], atol=1e-6)
    # the network is conditioned on the estimate and the time label of t
    called_est, _, label = net.calls[0]
    assert torch.equal(called_est, est)
    assert torch.allclose(label, (t.float() - 1) / 99)


@pytest.mark.parametrize("cls, kwargs, key", [
    (VP, dict(T=-5, beta_min=0.1, beta_max=0.2), "T"),
    (VE, dict(T=1000, sigma_min=50.0, sigma_max=10.0, rho=7.0), "sigma_min"),
    (VP, dict(T=10, beta_min=0.1, beta_max=0.01), "beta_min"),
    (VE, dict(T=10, sigma_min=0.01, sigma_max=1.0, rho=0.0), "rho"),
])
def test_bad_values_name_the_parameter(cls, kwargs, key):
    with pytest.raises(ValueError, match=key):
        cls.Config(**kwargs)


def test_prior_scales_ve_by_sigma_max():
    z = torch.randn(2, 1, 2, 2)
    assert torch.equal(vp(10).prior(z), z)
    assert torch.allclose(ve(10, sigma_max=80.0).prior(z), 80.0 * z)


def test_every_process_is_a_registered_choice():
    assert set(PROCESSES) == {"vp", "ve"}
    assert PROCESSES["vp"] is VP and PROCESSES["ve"] is VE
