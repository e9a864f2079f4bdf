import pytest
import torch

from dddm.diffusion import Diffusion
from dddm.rng import STREAM_SAMPLE_ESTIMATE, STREAM_SAMPLE_PRIOR, normal_per_index
from dddm.sampling import sample


class ContractionNet(torch.nn.Module):
    """A known F: F(x0_est, x_in, label) = 0.5 * x0_est + 0.1 * x_in; records every call's label."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x0_est, x_in, label):
        self.labels.append(label.clone())
        return 0.5 * x0_est + 0.1 * x_in


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sampler_is_the_fixed_point_iteration_at_t_equal_T(kind, steps):
    d = Diffusion(kind, 50)
    net = ContractionNet()
    shape, n, seed = (1, 4, 4), 6, 3
    out = sample(net, d, n, shape, steps, seed, batch_size=4)

    idx = torch.arange(n)
    est = normal_per_index(idx, shape, seed, STREAM_SAMPLE_ESTIMATE)
    x_T = normal_per_index(idx, shape, seed, STREAM_SAMPLE_PRIOR)
    if kind == "ve":
        x_T = x_T * d.sigma_max
    t = torch.full((n,), d.T)
    a, b = d.skip_coefficients(t)
    for _ in range(steps):  # x0_est <- a x_T + b F(x0_est, c_in x_T, T)
        est = a * x_T + b * (0.5 * est + 0.1 * x_T * d.input_scale(t))
    assert torch.allclose(out, est.clamp(-1, 1), atol=1e-5)
    # every call used t = T (label 1.0): 2 batches x steps calls
    assert len(net.labels) == 2 * steps
    assert all(torch.all(lab == 1.0) for lab in net.labels)


def test_sampler_is_seeded_batch_size_independent_and_clipped():
    d = Diffusion("ve", 50)
    net = ContractionNet()
    a = sample(net, d, 10, (1, 4, 4), 2, seed=7, batch_size=3)
    b = sample(net, d, 10, (1, 4, 4), 2, seed=7, batch_size=10)
    c = sample(net, d, 10, (1, 4, 4), 2, seed=8, batch_size=10)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert (a.abs() == 1).any()  # VE prior at sigma_max = 50 really needed the clip


def test_sampler_rejects_bad_steps():
    with pytest.raises(ValueError, match="^steps"):
        sample(ContractionNet(), Diffusion("vp", 10), 2, (1, 2, 2), 0, seed=0)
