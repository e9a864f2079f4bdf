"""Each method's loss and sampler against its formulas on tiny tensors, and the uDDDM switches."""

import math

import pytest
import torch

from conftest import repo_params
from dddm.config import merge_params, parse_config
from dddm.methods import EDM, ICT, METHODS, UDDDM, Progress
from dddm.methods.edm import precondition
from dddm.methods.cd import cd_sigmas, heun_step
from dddm.methods.ect import ect_r, ect_stage
from dddm.methods.ict import discretisation_steps, index_probabilities
from dddm.processes import karras_sigmas
from dddm.rng import (STREAM_SAMPLE_ESTIMATE, STREAM_SAMPLE_PRIOR, STREAM_TRAIN_NOISE, normal_per_index,
                      timestep_and_noise_per_index, uniform_and_noise_per_index)
from dddm.sampling import sample


def make(name, seed=0, **overrides):
    raw = merge_params(repo_params(), {"seed": seed, "method": {name: overrides}} if overrides else {"seed": seed})
    return parse_config(raw).make_method(name)


# ----------------------------------------------------------------------------------------- uDDDM

class ShiftNet(torch.nn.Module):
    """F = x0_est + w: the prediction is known in closed form and differs from x0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.25))

    def forward(self, x0_est, x_in, label):
        return x0_est + self.w


def test_udddm_loss_is_the_adaptive_loss_and_the_store_keeps_the_prediction():
    m = make("udddm", metric="l2", processes={"ve": {"T": 100}})
    x0, est, idx = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4), torch.arange(8)
    out = m.loss(ShiftNet(), x0, idx, Progress(epoch=2, step=50, total_steps=100), est)
    t, eps = timestep_and_noise_per_index(idx, (1, 4, 4), 100, 0, STREAM_TRAIN_NOISE, 2)
    x_t = m.process.add_noise(x0, t, eps)
    a, b = m.process.skip_coefficients(t)
    pred = a * x_t + b * (est + 0.25)
    assert not out.new_estimates.requires_grad
    assert torch.allclose(out.new_estimates, pred, atol=1e-6)
    w = 1 / 3  # epoch 2
    expected = w * (pred - x0).square().flatten(1).mean(1).mean() + (1 - w) * (pred - est).square().flatten(1).mean(1).mean()
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.terms["weight"] == pytest.approx(w)


def test_udddm_switches_change_what_the_store_holds_and_what_n_counts():
    x0, est, idx = torch.rand(4, 1, 4, 4) * 2 - 1, torch.randn(4, 1, 4, 4), torch.arange(4)
    progress = Progress(epoch=1, step=40, total_steps=100)
    data = make("udddm", estimates_from="data").loss(ShiftNet(), x0, idx, progress, est)
    paper = make("udddm").loss(ShiftNet(), x0, idx, progress, est)
    assert torch.equal(data.new_estimates, x0)  # the released code's reading
    assert not torch.allclose(paper.new_estimates, x0)  # the paper's: the prediction
    assert paper.terms["weight"] == pytest.approx(1 / 2)  # n = epoch 1
    assert make("udddm", n_counts="step").loss(ShiftNet(), x0, idx, progress, est).terms["weight"] == \
        pytest.approx(1 / 41)  # n = step 40


def test_udddm_noise_depends_on_index_not_on_batch_composition():
    m = make("udddm", seed=1)
    x0, est = torch.zeros(6, 1, 4, 4), torch.zeros(6, 1, 4, 4)
    idx = torch.tensor([5, 9, 2, 7, 1, 0])
    p = Progress(0, 0, 10)
    full = m.loss(ShiftNet(), x0, idx, p, est).new_estimates
    part = m.loss(ShiftNet(), x0[3:], idx[3:], p, est[3:]).new_estimates
    assert torch.equal(full[3:], part)
    assert not torch.equal(full, m.loss(ShiftNet(), x0, idx, Progress(1, 0, 10), est).new_estimates)


class ContractionNet(torch.nn.Module):
    """A known F(x0_est, x_in, label) = 0.5 x0_est + 0.1 x_in; records every call's label."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x0_est, x_in, label):
        self.labels.append(label.clone())
        return 0.5 * x0_est + 0.1 * x_in


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("steps", [1, 3])
def test_udddm_sampler_is_the_fixed_point_iteration_at_t_equal_T(process, steps):
    m = make("udddm", seed=3, process=process)
    net, shape, n = ContractionNet(), (1, 4, 4), 6
    out = sample(m, net, n, shape, steps, batch_size=4)
    idx = torch.arange(n)
    est = normal_per_index(idx, shape, 3, STREAM_SAMPLE_ESTIMATE)
    x_T = m.process.prior(normal_per_index(idx, shape, 3, STREAM_SAMPLE_PRIOR))
    t = torch.full((n,), m.process.T)
    a, b = m.process.skip_coefficients(t)
    for _ in range(steps):
        est = a * x_T + b * (0.5 * est + 0.1 * x_T * m.process.input_scale(t))
    assert torch.allclose(out, est.clamp(-1, 1), atol=1e-5)
    assert len(net.labels) == 2 * steps and all(torch.all(lab == 1.0) for lab in net.labels)  # t = T always


# ------------------------------------------------------------------------------- Gaussian data
# For data x0 ~ N(mu, s^2) per pixel, the ideal denoiser and consistency function are known in closed
# form, so a "network" that computes them lets the samplers be checked against the distribution.
MU, S = 0.3, 0.2


class IdealNet(torch.nn.Module):
    """Inverts the preconditioning: F such that c_skip x + c_out F equals `target(x, sigma)`."""

    def __init__(self, target, sigma_data, sigma_min=0.0):
        super().__init__()
        self.target, self.sd, self.s0 = target, sigma_data, sigma_min

    def forward(self, x0_est, x_in, label):
        assert x0_est is None
        sigma = (4 * label.double()).exp().view(-1, 1, 1, 1)
        x = x_in.double() * (sigma ** 2 + self.sd ** 2).sqrt()
        c_skip = self.sd ** 2 / ((sigma - self.s0) ** 2 + self.sd ** 2)
        c_out = (sigma - self.s0) * self.sd / (sigma ** 2 + self.sd ** 2).sqrt()
        return ((self.target(x, sigma) - c_skip * x) / c_out).float()


def ideal_denoiser(x, sigma):
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def ideal_consistency(sigma_min):
    return lambda x, sigma: MU + (x - MU) * ((S ** 2 + sigma_min ** 2) / (S ** 2 + sigma ** 2)).sqrt()


def test_edm_preconditioning_formulas():
    x, sigma = torch.randn(3, 1, 2, 2), torch.tensor([0.01, 1.0, 50.0]).view(-1, 1, 1, 1)
    net = lambda est, x_in, label: torch.ones_like(x_in)  # noqa: E731
    out = precondition(net, x, sigma, 0.5)
    c_skip, c_out = 0.25 / (sigma ** 2 + 0.25), sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
    assert torch.allclose(out, c_skip * x + c_out, atol=1e-6)
    # with sigma_min: f(x, sigma_min) = x exactly (the consistency boundary condition)
    edge = precondition(net, x, torch.full((3, 1, 1, 1), 0.002), 0.5, 0.002)
    assert torch.allclose(edge, x)


def test_edm_loss_weight_and_noise_level_follow_the_formulas():
    m = make("edm")
    x0, idx = torch.rand(5, 1, 4, 4) * 2 - 1, torch.arange(5)
    out = m.loss(IdealNet(lambda x, s: torch.zeros_like(x), 0.5), x0, idx, Progress(0, 0, 10))
    u, n = uniform_and_noise_per_index(idx, (1, 4, 4), 0, STREAM_TRAIN_NOISE, 0)
    sigma = (-1.2 + 1.2 * torch.special.ndtri(u)).exp().view(-1, 1, 1, 1)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * x0.double() ** 2).flatten(1).mean(1).mean()  # D = 0
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-4)


def test_edm_heun_sampler_reproduces_gaussian_data():
    """The probability-flow ODE of N(MU, S^2) data ends in that distribution; Heun's error shrinks with N
    (this narrow Gaussian is stiff near sigma ~ S: 18 steps give its std 8% wide, 200 steps 0.5%)."""
    m = make("edm")
    stds = {}
    for n in (18, 200):
        out = sample(m, IdealNet(ideal_denoiser, 0.5), 2000, (1, 2, 2), n, batch_size=1000)
        assert out.mean().item() == pytest.approx(MU, abs=0.01)
        stds[n] = out.std().item()
    assert stds[200] == pytest.approx(S, rel=0.02)
    assert abs(stds[200] - S) < abs(stds[18] - S) < 0.1 * S
    assert m.evaluations(18) == 35 and m.evaluations(1) == 1
    sigmas = m.sampling_sigmas(18)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002) and sigmas[-1] == 0


def test_ict_curriculum_probabilities_and_weights():
    # N(k) doubles from s0 + 1 to s1 + 1: K' = floor(K / (log2 floor(1280 / 10) + 1)) = floor(800 / 8) = 100
    assert [discretisation_steps(k, 800, 10, 1280) for k in (0, 99, 100, 250, 799)] == [11, 11, 21, 41, 1281]
    sigmas = karras_sigmas(11, 0.002, 80.0, 7.0)
    p = index_probabilities(sigmas, -1.1, 2.0)
    erf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas.tolist()]
    mass = [b - a for a, b in zip(erf[:-1], erf[1:])]
    assert torch.allclose(p, torch.tensor(mass, dtype=torch.float64) / sum(mass))


def test_ict_loss_matches_the_formula():
    """With F = 0, f(x, sigma) = c_skip(sigma) x: the loss recomputed by hand from the same draws."""
    m = make("ict")
    x0, idx = torch.rand(6, 1, 4, 4) * 2 - 1, torch.arange(6)
    zero_net = lambda est, x_in, label: torch.zeros_like(x_in)  # noqa: E731
    out = m.loss(zero_net, x0, idx, Progress(0, 0, 800))
    assert out.terms["levels"] == 11
    sigmas = karras_sigmas(11, 0.002, 80.0, 7.0)
    u, z = uniform_and_noise_per_index(idx, (1, 4, 4), 0, STREAM_TRAIN_NOISE, 0)
    i = torch.searchsorted(index_probabilities(sigmas, -1.1, 2.0).cumsum(0), u, right=True)
    lo, hi = sigmas[i].view(-1, 1, 1, 1), sigmas[i + 1].view(-1, 1, 1, 1)
    c_skip = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)  # noqa: E731
    student, target = c_skip(hi) * (x0 + hi * z), c_skip(lo) * (x0 + lo * z)
    c = 0.00054 * math.sqrt(16)
    d = ((student - target).flatten(1).square().sum(1) + c * c).sqrt() - c
    assert out.total.item() == pytest.approx((d / (sigmas[i + 1] - sigmas[i])).mean().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["ict", "ect", "cd"])
@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_samplers_reproduce_gaussian_data_with_an_ideal_consistency_function(name, steps):
    m = make(name)
    out = sample(m, IdealNet(ideal_consistency(0.002), 0.5, 0.002), 2000, (1, 2, 2), steps, batch_size=2000)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, rel=0.04)
    assert m.evaluations(steps) == steps


@pytest.mark.parametrize("name", sorted(METHODS))
def test_samples_depend_on_seed_and_index_not_on_batch_size(name):
    from dddm.unet import build_network

    cfg = parse_config(merge_params(repo_params(), {"seed": 7}))
    m = cfg.make_method(name)
    torch.manual_seed(0)
    net = build_network(cfg.model, 8, 1, m.conditioning)
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)  # non-zero output
    a = sample(m, net, 10, (1, 8, 8), max(m.sampler.steps), batch_size=3)
    b = sample(m, net, 10, (1, 8, 8), max(m.sampler.steps), batch_size=10)
    c = sample(cfg.make_method(name, seed=8), net, 10, (1, 8, 8), max(m.sampler.steps), batch_size=10)
    assert torch.allclose(a, b, atol=1e-4)  # float kernels differ by batch size, nothing more
    assert not torch.allclose(a, c, atol=1e-2)
    assert a.min() >= -1 and a.max() <= 1


def test_registry_and_interfaces():
    assert set(METHODS) == {"udddm", "ict", "edm", "ect", "cd"}
    assert all(cls.name == name for name, cls in METHODS.items())  # the key each class's params section has
    assert METHODS["udddm"].uses_store and not any(METHODS[m].uses_store for m in ("ict", "edm", "ect"))
    assert all(make(m).conditioning == "none" for m in ("ict", "edm", "ect"))
    assert make("udddm").conditioning == "cross_attention"
    assert isinstance(make("edm"), EDM) and isinstance(make("ict"), ICT) and isinstance(make("udddm"), UDDDM)


# ------------------------------------------------------------------------------------------ ECT

def test_ect_stages_and_r_schedule_follow_the_formulas():
    # 8 equal stages over 800 steps
    assert [ect_stage(k, 800, 8) for k in (0, 99, 100, 450, 799)] == [0, 0, 1, 4, 7]
    t = torch.tensor([0.001, 0.05, 0.5, 2.0, 80.0])
    for stage in (0, 3, 7):
        n = 1 + 8 * torch.sigmoid(-1.0 * t)
        expected = torch.clamp(t * (1 - n / 2.0 ** (stage + 1)), min=0)
        assert torch.allclose(ect_r(t, stage, 2.0, 8.0, 1.0), expected)
    # stage 0: every t below about 1.6 has r = 0 (the denoising loss); the gap shrinks each stage
    assert (ect_r(t[:3], 0, 2.0, 8.0, 1.0) == 0).all()
    gaps = [(t - ect_r(t, s, 2.0, 8.0, 1.0))[-1].item() for s in range(8)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))


class LinearDropoutNet(torch.nn.Module):
    """F = dropout(x_in) * w: outputs depend on the dropout mask and on x in closed form."""

    def __init__(self, p=0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.p = p

    def forward(self, est, x_in, label):
        return torch.nn.functional.dropout(x_in, self.p, training=True) * self.w


def test_ect_loss_matches_the_formula_with_the_same_dropout_mask_in_both_calls():
    m = make("ect")
    x0, idx = torch.rand(6, 1, 4, 4) * 2 - 1, torch.arange(6)
    net = LinearDropoutNet()
    torch.manual_seed(3)
    out = m.loss(net, x0, idx, Progress(0, 700, 800))  # stage 7: most t have r > 0
    assert out.terms["stage"] == 7
    # by hand, from the same draws and the same mask
    u, eps = uniform_and_noise_per_index(idx, (1, 4, 4), 0, STREAM_TRAIN_NOISE, 0)
    t = (-1.1 + 2.0 * torch.special.ndtri(u)).exp().float().view(-1, 1, 1, 1)
    r = ect_r(t, 7, 2.0, 8.0, 1.0)
    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones(6, 1, 4, 4), 0.5, training=True)

    def D(x, s):  # EDM's denoiser with F = mask * c_in x * w
        c_skip, c_out, c_in = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt(), 1 / (s ** 2 + 0.25).sqrt()
        return c_skip * x + c_out * mask * c_in * x * 0.3

    target = torch.where(r == 0, x0, D(x0 + r * eps, torch.where(r == 0, t, r)))
    d = (D(x0 + t * eps, t) - target).flatten(1).square().sum(1).sqrt()
    assert out.total.item() == pytest.approx((d / (t - r).flatten()).mean().item(), rel=1e-4)
    assert out.terms["r_zero"] == pytest.approx((r == 0).float().mean().item())
    # the target call drew no fresh mask: the next draw is the one after a single network call
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.nn.functional.dropout(torch.ones(6, 1, 4, 4), 0.5, training=True)
    assert torch.equal(after, torch.rand(1))


def test_ect_target_gets_no_gradient_and_c_switches_to_pseudo_huber():
    x0, idx = torch.rand(4, 1, 4, 4) * 2 - 1, torch.arange(4)
    net = LinearDropoutNet(p=0.0)
    plain = make("ect").loss(net, x0, idx, Progress(0, 700, 800))
    huber = make("ect", huber_c=0.03).loss(net, x0, idx, Progress(0, 700, 800))
    assert huber.total.item() < plain.total.item()  # sqrt(d^2 + c^2) - c < d
    plain.total.backward()
    assert net.w.grad is not None and net.w.grad.item() != 0


# ------------------------------------------------------------------------------------------- CD

def test_cd_discretisation_is_cms_karras_grid_from_sigma_max_down():
    t = cd_sigmas(18, 0.002, 80.0, 7.0)
    i = torch.arange(18, dtype=torch.float64)
    cm = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7  # karras_diffusion.py's t
    assert torch.allclose(t, cm) and t[0] == pytest.approx(80.0) and t[-1] == pytest.approx(0.002)


def test_cd_heun_step_follows_the_teachers_ode_to_third_order():
    """On Gaussian data the ideal denoiser's ODE has the closed form x(t) = MU + (x - MU) sqrt((S^2 + t^2) /
    (S^2 + t0^2)); one Heun step's error shrinks as h^3."""
    x = torch.tensor([[-1.0, 0.2], [0.7, 2.0]], dtype=torch.float64).view(2, 1, 2, 1)

    def error(h):
        t, t_next = torch.full((2, 1, 1, 1), 1.0, dtype=torch.float64), torch.full((2, 1, 1, 1), 1.0 - h,
                                                                                   dtype=torch.float64)
        exact = MU + (x - MU) * ((S ** 2 + t_next ** 2) / (S ** 2 + t ** 2)).sqrt()
        return (heun_step(ideal_denoiser, x, t, t_next) - exact).abs().max().item()

    assert error(0.1) < 1e-3 and 6 < error(0.1) / error(0.05) < 10  # third order: a ratio of 8


def test_cd_loss_matches_the_formula_with_the_teachers_step_and_the_same_dropout_mask():
    from types import SimpleNamespace

    m = make("cd", N=18, mu=0.0)  # CIFAR-10's grid; the target is the student itself
    x0, idx = torch.rand(6, 1, 4, 4) * 2 - 1, torch.arange(6)
    net = LinearDropoutNet()
    teacher = SimpleNamespace(net=IdealNet(ideal_denoiser, 0.5), method=SimpleNamespace(cfg=SimpleNamespace(
        sigma_data=0.5)))
    m.begin_training(net, teacher)
    torch.manual_seed(3)
    out = m.loss(net, x0, idx, Progress(0, 10, 100))
    # by hand, from the same draws and the same mask
    u, z = uniform_and_noise_per_index(idx, (1, 4, 4), 0, STREAM_TRAIN_NOISE, 0)
    n = torch.floor(u * 17).long().clamp(max=16)
    grid = cd_sigmas(18, 0.002, 80.0, 7.0)
    t, t2 = (grid[j].float().view(-1, 1, 1, 1) for j in (n, n + 1))
    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones(6, 1, 4, 4), 0.5, training=True)

    def f(x, s):  # the consistency function with F = mask * c_in x * w
        c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
        c_out, c_in = (s - 0.002) * 0.5 / (s ** 2 + 0.25).sqrt(), 1 / (s ** 2 + 0.25).sqrt()
        return c_skip * x + c_out * mask * c_in * x * 0.3

    x = x0 + t * z
    d = (x - ideal_denoiser(x, t)) / t
    euler = x + d * (t2 - t)
    x2 = x + (d + (euler - ideal_denoiser(euler, t2)) / t2) * (t2 - t) / 2  # cm's heun_solver
    expected = (f(x, t) - f(x2, t2)).square().flatten(1).mean(1).mean()  # cm's l2, uniform weighting
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.terms["t_mean"].item() == pytest.approx(t.mean().item())
    out.total.backward()
    assert net.w.grad is not None and net.w.grad.item() != 0  # through the student only
    huber = make("cd", N=18, mu=0.0, metric="pseudo_huber", huber_scale=0.01)
    huber.begin_training(net, teacher)
    torch.manual_seed(3)
    c = 0.01 * 4  # huber_scale sqrt(16)
    assert huber.loss(net, x0, idx, Progress(0, 10, 100)).total.item() == pytest.approx(
        (((f(x, t) - f(x2, t2)).square().flatten(1).sum(1) + c * c).sqrt() - c).mean().item(), rel=1e-4)


def test_cd_target_network_is_the_students_moving_average_and_a_checkpoint_keeps_it():
    from types import SimpleNamespace

    net = LinearDropoutNet(p=0.0)
    teacher = SimpleNamespace(net=IdealNet(ideal_denoiser, 0.5), method=SimpleNamespace(cfg=SimpleNamespace(
        sigma_data=0.5)))
    m = make("cd", mu=0.9)
    m.begin_training(net, teacher)
    with torch.no_grad():
        net.w.fill_(1.3)
    m.end_step(net)
    assert m.target.module.w.item() == pytest.approx(0.9 * 0.3 + 0.1 * 1.3)  # mu theta^- + (1 - mu) theta
    again = make("cd", mu=0.9)
    again.begin_training(LinearDropoutNet(p=0.0), teacher)
    again.load_training_state(m.training_state())
    assert again.target.module.w.item() == pytest.approx(m.target.module.w.item())
    plain = make("cd", mu=0.0)
    plain.begin_training(net, teacher)
    assert plain.target is None and plain.training_state() == {}  # mu 0: the target is the student itself
    with pytest.raises(ValueError, match="finetune.teacher"):
        make("cd").begin_training(net, None)
