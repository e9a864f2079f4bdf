"""Tests for the ADM-style U-Net F_theta(x0_est, x_t, noise_label) in dddm.unet."""

import pytest
import torch

from dddm.unet import UNet, group_norm

MODES = ("cross_attention", "concat")


def tiny(conditioning="cross_attention", **overrides):
    kwargs = dict(image_size=8, channels=1, base_channels=16, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=(8, 4), dropout=0.0, num_heads=2,
                  conditioning=conditioning)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return UNet(**kwargs).eval()


def inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.channels, model.image_size, model.image_size)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(batch, generator=g)


def make_output_nonzero(model):
    with torch.no_grad():
        model.out_conv.weight.normal_(std=0.1)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("conditioning", MODES)
@pytest.mark.parametrize("channels,image_size,channel_mult,attn", [
    (1, 8, (1, 2), (4,)),
    (3, 16, (1, 2, 2), (8,)),
    (1, 32, (1, 2, 2, 2), (16, 8)),
    (3, 32, (1,), ()),          # no downsampling: middle attention at full size
    (3, 12, (1, 2), (6,)),      # sides need only be divisible, not powers of two
])
def test_output_shape_matches_input(conditioning, channels, image_size, channel_mult, attn):
    model = tiny(conditioning, channels=channels, image_size=image_size,
                 channel_mult=channel_mult, attn_resolutions=attn)
    make_output_nonzero(model)
    x0_est, x_t, label = inputs(model)
    out = model(x0_est, x_t, label)
    assert out.shape == x_t.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("conditioning", MODES)
def test_output_is_exactly_zero_at_init(conditioning):
    model = tiny(conditioning)
    out = model(*inputs(model))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("conditioning", MODES)
def test_output_depends_on_every_input(conditioning):
    model = tiny(conditioning)
    make_output_nonzero(model)
    x0_est, x_t, label = inputs(model)
    with torch.no_grad():
        out = model(x0_est, x_t, label)
        assert not torch.allclose(out, model(torch.randn_like(x0_est), x_t, label))
        assert not torch.allclose(out, model(x0_est, torch.randn_like(x_t), label))
        assert not torch.allclose(out, model(x0_est, x_t, 1 - label))
        # eval mode with dropout=0: the same inputs give the same output
        assert torch.equal(out, model(x0_est, x_t, label))


def test_cross_attention_is_the_only_path_for_the_estimate():
    model = tiny("cross_attention")
    make_output_nonzero(model)
    assert model.input_conv.in_channels == model.channels
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cross_attn.proj." in name:
                p.zero_()
    x0_est, x_t, label = inputs(model)
    with torch.no_grad():
        out = model(x0_est, x_t, label)
        assert torch.equal(out, model(torch.randn_like(x0_est), x_t, label))


def test_concat_mode_has_no_cross_attention():
    model = tiny("concat")
    assert model.input_conv.in_channels == 2 * model.channels
    assert model.estimate_encoder is None
    assert not any("cross_attn" in name for name, _ in model.named_parameters())


def test_cross_attention_layers_sit_at_every_attention_resolution():
    model = tiny("cross_attention", image_size=16, channel_mult=(1, 2, 2), attn_resolutions=(8,))
    sides = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: sides.add(out.shape[-1]))
             for name, m in model.named_modules() if name.endswith("cross_attn")]
    with torch.no_grad():
        model(*inputs(model))
    for h in hooks:
        h.remove()
    # At 8x8: 1 encoder + 2 decoder blocks; at 4x4: the middle block only.
    assert len(hooks) == 4
    assert sides == {8, 4}


def test_gradients_reach_estimate_encoder_and_cross_attention():
    model = tiny("cross_attention").train()
    make_output_nonzero(model)
    x0_est, x_t, label = inputs(model)
    x0_est.requires_grad_(True)
    model(x0_est, x_t, label).square().mean().backward()
    assert x0_est.grad is not None and x0_est.grad.abs().sum() > 0
    checked = 0
    for name, p in model.named_parameters():
        if name.startswith("estimate_encoder.") or ".cross_attn." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("overrides,argument", [
    (dict(image_size=30, channel_mult=(1, 2, 2, 2)), "image_size"),
    (dict(image_size=0), "image_size"),
    (dict(attn_resolutions=(16,)), "attn_resolutions"),
    (dict(attn_resolutions=(3,)), "attn_resolutions"),
    (dict(conditioning="film"), "conditioning"),
    (dict(channels=0), "channels"),
    (dict(base_channels=0), "base_channels"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_heads=0), "num_heads"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(num_heads=3), "num_heads"),   # 16 and 32 wide stages, both attended
    # the middle block always attends: its 6-wide bottom stage needs num_heads | 6
    (dict(base_channels=6, channel_mult=(2, 1), attn_resolutions=(), num_heads=4), "num_heads"),
])
def test_invalid_arguments_name_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        tiny(**overrides)


def test_invalid_arguments_messages_are_informative():
    with pytest.raises(ValueError, match=r"^image_size: 30 is not divisible by 8"):
        tiny(image_size=30, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[8, 4\]"):  # the reachable sides are listed
        tiny(attn_resolutions=(16,))


def test_num_heads_only_needs_to_divide_attended_stages():
    # 6 is not divisible by 4, but the 8x8 stage (width 6) has no attention;
    # the 4x4 stage (width 12) has the middle block's.
    model = tiny(base_channels=6, channel_mult=(1, 2), attn_resolutions=(), num_heads=4)
    assert model(*inputs(model)).shape == (2, 1, 8, 8)


def test_forward_rejects_mismatched_inputs():
    model = tiny()
    x0_est, x_t, label = inputs(model)
    with pytest.raises(ValueError, match="noise_label"):
        model(x0_est, x_t, label[:1])
    with pytest.raises(ValueError, match="x0_est the same shape"):
        model(x0_est[:, :, :4], x_t, label)
    with pytest.raises(ValueError, match="x0_est the same shape"):
        model(None, x_t, label)


def test_unconditional_network_takes_no_estimate():
    model = tiny(conditioning="none")
    x0_est, x_t, label = inputs(model)
    assert model.estimate_encoder is None and model.input_conv.in_channels == 1
    assert model(None, x_t, label).shape == x_t.shape
    with pytest.raises(ValueError, match="x0_est None"):
        model(x0_est, x_t, label)


@pytest.mark.parametrize("channels,groups", [(3, 3), (16, 16), (48, 24), (96, 32), (256, 32), (17, 17), (34, 17)])
def test_group_norm_uses_largest_divisor_up_to_32(channels, groups):
    assert group_norm(channels).num_groups == groups


@pytest.mark.parametrize("conditioning", MODES)
def test_parameter_count_grows_with_blocks_and_width(conditioning):
    small = n_params(tiny(conditioning))
    assert n_params(tiny(conditioning, num_blocks=2)) > small
    assert n_params(tiny(conditioning, base_channels=32)) > small


def test_paper_cifar10_config_builds_with_tens_of_millions_of_parameters():
    model = UNet(image_size=32, channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                 num_blocks=3, attn_resolutions=(16, 8), dropout=0.3)
    count = n_params(model)
    print(f"paper CIFAR-10 config: {count:,} parameters")
    assert 30e6 < count < 100e6
