"""Speed options (dddm/performance.py, the attention layout): same results, bit-exact resume."""

import pytest
import torch
from torch.profiler import profile

from conftest import tiny_params
from dddm.config import parse_config
from dddm.data import prepare_dataset
from dddm.performance import adam, bf16_autocast, cpu_has_native_bf16
from dddm.training import train
from dddm.unet import UNet


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prepared.arrow"
    prepare_dataset("digits", None, 8, path, progress=False)
    return path


def test_attention_runs_the_fused_cpu_kernel_without_safe_softmax_masking():
    net = UNet(16, 1, 16, (1, 2), 1, (8,), 0.0, 4, "cross_attention")
    x = torch.randn(4, 1, 16, 16)
    with profile() as prof:
        net(torch.randn_like(x), x, torch.rand(4)).square().sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert not ops & {"aten::_safe_softmax", "aten::isneginf", "aten::_scaled_dot_product_attention_math"}, ops


def test_fused_kernel_attention_equals_the_math_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    net = UNet(16, 3, 16, (1, 2), 1, (16, 8), 0.0, 4, "cross_attention")
    torch.nn.init.normal_(net.out_conv.weight)  # zero at init: the output would show nothing
    est, x, t = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.rand(4)
    fused = net(est, x, t)
    with sdpa_kernel(SDPBackend.MATH):
        math_path = net(est, x, t)
    assert 0 < (fused - math_path).abs().max() < 1e-5 * math_path.abs().max()  # another kernel, same values


def test_autocast_only_where_asked_and_supported():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not bf16_autocast(cpu, cuda_bf16=True, cpu_bf16=False)._enabled
    assert bf16_autocast(cpu, cuda_bf16=False, cpu_bf16=True)._enabled == cpu_has_native_bf16()
    if torch.cuda.is_available():  # without CUDA, torch disables a CUDA autocast itself
        assert bf16_autocast(cuda, cuda_bf16=True, cpu_bf16=False)._enabled
    assert not bf16_autocast(cuda, cuda_bf16=False, cpu_bf16=True)._enabled


def test_fused_adam_equals_the_for_loop_kernel_to_float_rounding():
    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(20)]
    results = []
    for make in (lambda ps: adam(ps, 2e-4, torch.device("cpu")), lambda ps: torch.optim.Adam(ps, 2e-4, foreach=False)):
        ps = [p.clone().requires_grad_() for p in params]
        opt = make(ps)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        results.append(ps)
    assert results[0][0] is not None and adam(results[0], 1.0, torch.device("cpu")).defaults["fused"]
    for a, b, p0 in zip(*results, params):
        assert (a - p0).abs().max() > 1e-3  # the steps moved the weights...
        assert torch.allclose(a, b, rtol=0, atol=1e-6)  # ...the same way


# (train options, model): torch.compile's check on a one-level network with attention, which inductor compiles in
# about 0.75 of the tiny two-level one's time with an empty cache, as on a fresh machine (2 min there)
OPTIONS = [pytest.param({"cpu_bf16": True}, {}, id="cpu_bf16",
                        marks=pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 on this CPU")),
           pytest.param({"compile": True}, {"channel_mult": [1], "attn_resolutions": [8]}, id="compile",
                        marks=pytest.mark.slow)]


@pytest.mark.parametrize("options, model", OPTIONS)
def test_resume_is_bit_exact_with_the_option_on(tmp_path, prepared, options, model):
    """Two epochs in one run equal one epoch, then a resume for the second, bit for bit."""
    def cfg(epochs):  # 1797 digits = 3 batches of 599: one batch shape, so torch.compile compiles once
        return parse_config(tiny_params(train={"epochs": epochs, "batch_size": 599, "checkpoint_every": 0,
                                               "checkpoint_dir": str(tmp_path / "ck"), **options},
                                        model={"dropout": 0.2, **model}))  # dropout: the restored RNG state

    whole = train(cfg(2), "udddm", prepared, tmp_path / "whole-out", tmp_path / "whole", progress=False)
    train(cfg(1), "udddm", prepared, tmp_path / "split-out", tmp_path / "split", progress=False)
    split = train(cfg(2), "udddm", prepared, tmp_path / "split-out", tmp_path / "split", progress=False)
    assert whole.global_step == split.global_step == 6
    for a, b in ((whole.net.state_dict(), split.net.state_dict()), (whole.ema.state_dict(), split.ema.state_dict())):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert torch.equal(whole.store.estimates(), split.store.estimates())
    assert not torch.equal(whole.net.state_dict()["out_conv.weight"], torch.zeros_like(whole.net.out_conv.weight))
