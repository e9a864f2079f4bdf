"""ADM-style U-Net for uDDDM: the network F_theta(x0_est, x_t, noise_label).

Layout follows Dhariwal & Nichol's ADM (guided-diffusion): residual blocks with
GroupNorm + SiLU and an adaptive scale-shift from the noise embedding, attention
at chosen resolutions, a res/attention/res middle block and a decoder fed by
skip connections. The estimate ``x0_est`` is brought in either through
cross-attention at every attention block (the paper's choice) or by
concatenating it with ``x_t`` at the input; methods without an estimate
(iCT, EDM) build it with conditioning "none" and pass ``x0_est=None``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONDITIONING_MODES = ("cross_attention", "concat", "none")  # none: no x0 estimate (iCT, EDM)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below that."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def noise_embedding(noise_label: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of labels in [0, 1].

    Labels are scaled by 1000 first so that neighbouring noise levels differ by
    about a radian at the highest frequency, as with ADM's integer timesteps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=noise_label.device) / half)
    args = 1000.0 * noise_label.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:  # odd widths get one zero column
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block; the noise embedding scales and shifts the second norm."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv lets the skip path change width; identity otherwise.
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, C, N) -> (B, heads, N, C // heads), the layout scaled_dot_product_attention wants."""
    b, c, n = x.shape
    # Contiguous: on CPU the fused (flash) kernel needs the last dim dense, else the slower math
    # path with its safe-softmax masking runs (2.7x the time, forward + backward, at 16x16).
    return x.reshape(b, num_heads, c // num_heads, n).transpose(2, 3).contiguous()


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, heads * d, N)."""
    b, heads, n, d = x.shape
    return x.transpose(2, 3).reshape(b, heads * d, n)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).reshape(b, c, h * w)).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(*(_heads(t, self.num_heads) for t in (q, k, v)))
        return x + self.proj(_merge_heads(out)).reshape(b, c, h, w)


class CrossAttention(nn.Module):
    """Multi-head attention from feature-map positions (queries) to context tokens (keys/values).

    The output projection keeps PyTorch's default init, not zero, so the
    context already changes the output at initialisation.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.context_norm = group_norm(channels)
        self.q = nn.Conv1d(channels, channels, 1)
        self.kv = nn.Conv1d(channels, 2 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm(x).reshape(b, c, h * w))
        k, v = self.kv(self.context_norm(context).flatten(2)).chunk(2, dim=1)
        out = F.scaled_dot_product_attention(*(_heads(t, self.num_heads) for t in (q, k, v)))
        return x + self.proj(_merge_heads(out)).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    """Self-attention, then (in cross_attention mode) cross-attention to the estimate's features."""

    def __init__(self, channels: int, num_heads: int, cross: bool):
        super().__init__()
        self.self_attn = SelfAttention(channels, num_heads)
        self.cross_attn = CrossAttention(channels, num_heads) if cross else None

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context)
        return x


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv (ADM's conv_resample=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv to smooth it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EstimateEncoder(nn.Module):
    """Small conv encoder of x0_est giving a feature map at each requested resolution.

    One GroupNorm/SiLU/conv per level at a constant width, average pooling
    between levels, and a 1x1 projection to the U-Net's width at every
    resolution where an attention block needs context.
    """

    def __init__(self, channels: int, width: int, stage_channels: list[int], image_size: int,
                 resolutions: set[int]):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        # Levels beyond the deepest needed resolution would be unused weights.
        depth = max(level for level in range(len(stage_channels))
                    if image_size >> level in resolutions) + 1
        self.levels = nn.ModuleList(
            nn.Sequential(group_norm(width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(depth)
        )
        self.proj = nn.ModuleDict({
            str(image_size >> level): nn.Conv2d(width, stage_channels[level], 1)
            for level in range(depth) if image_size >> level in resolutions
        })

    def forward(self, x0_est: Tensor) -> dict[int, Tensor]:
        h = self.stem(x0_est)
        features = {}
        for level, block in enumerate(self.levels):
            if level:
                h = F.avg_pool2d(h, 2)
            h = block(h)
            if str(h.shape[-1]) in self.proj:
                features[h.shape[-1]] = self.proj[str(h.shape[-1])](h)
        return features


def check_architecture(image_size: int, base_channels: int, channel_mult, attn_resolutions, num_heads: int) -> None:
    """The rules that tie the network's shape to the image size; each message starts with the
    parameter to change (config.py prefixes its section)."""
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult: must be a non-empty sequence of positive ints, got {channel_mult}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size: {image_size} is not divisible by {factor}, the U-Net's downsampling "
                         f"factor for channel_mult of length {len(channel_mult)}")
    reachable = [image_size >> level for level in range(len(channel_mult))]
    unreachable = sorted(set(attn_resolutions) - set(reachable), reverse=True)
    if unreachable:
        raise ValueError(f"attn_resolutions: {unreachable} never occur in the U-Net; it reaches {reachable}")
    # The middle block always attends, at the lowest resolution.
    attended = set(attn_resolutions) | {reachable[-1]}
    for level, (side, mult) in enumerate(zip(reachable, channel_mult)):
        width = base_channels * mult
        if side in attended and width % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide the width {width} "
                             f"(base_channels {base_channels} * channel_mult[{level}] {mult}) "
                             f"of the {side}x{side} stage, which has attention")


def _validate(image_size, channels, base_channels, channel_mult, num_blocks, attn_resolutions,
              dropout, num_heads, conditioning) -> None:
    for name, value in (("channels", channels), ("base_channels", base_channels),
                        ("num_blocks", num_blocks), ("num_heads", num_heads),
                        ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout}")
    if conditioning not in CONDITIONING_MODES:
        raise ValueError(f"conditioning: must be one of {CONDITIONING_MODES}, got {conditioning!r}")
    check_architecture(image_size, base_channels, channel_mult, attn_resolutions, num_heads)


class Unit(nn.ModuleList):
    """Layers run in order, each handed what it needs (ADM's TimestepEmbedSequential).

    One unit produces one encoder skip or consumes one in the decoder.
    """

    def forward(self, h: Tensor, emb: Tensor, context: dict[int, Tensor]) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context.get(h.shape[-1]))
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """F_theta(x0_est, x_t, noise_label) -> tensor shaped like x_t.

    The output conv is zero-initialised, so F = 0 at initialisation. Unlike ADM,
    which also zeroes the last conv of every residual branch and the attention
    output, the other layers keep PyTorch's default init: the noise label and
    the estimate then shape the output as soon as the output conv moves.
    """

    def __init__(self, image_size: int, channels: int, base_channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_blocks: int = 3,
                 attn_resolutions: tuple[int, ...] = (16, 8), dropout: float = 0.3,
                 num_heads: int = 4, conditioning: str = "cross_attention"):
        super().__init__()
        _validate(image_size, channels, base_channels, channel_mult, num_blocks,
                  attn_resolutions, dropout, num_heads, conditioning)
        self.image_size = image_size
        self.channels = channels
        self.base_channels = base_channels
        self.conditioning = conditioning
        cross = conditioning == "cross_attention"
        stage_channels = [base_channels * m for m in channel_mult]
        attn_resolutions = set(attn_resolutions)
        bottom = image_size >> (len(channel_mult) - 1)

        emb_channels = 4 * base_channels
        self.noise_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        # The middle block attends at the bottom resolution, so it needs context there too.
        self.estimate_encoder = (
            EstimateEncoder(channels, base_channels, stage_channels, image_size,
                            attn_resolutions | {bottom})
            if cross else None
        )

        def res_unit(in_ch: int, out_ch: int, side: int) -> Unit:
            unit = Unit([ResBlock(in_ch, out_ch, emb_channels, dropout)])
            if side in attn_resolutions:
                unit.append(AttentionBlock(out_ch, num_heads, cross))
            return unit

        ch = stage_channels[0]
        self.input_conv = nn.Conv2d(2 * channels if conditioning == "concat" else channels, ch, 3, padding=1)

        # Encoder; each unit's output width is remembered for the decoder's skips.
        self.encoder = nn.ModuleList()
        skip_channels = [ch]
        side = image_size
        for level, out_ch in enumerate(stage_channels):
            for _ in range(num_blocks):
                self.encoder.append(res_unit(ch, out_ch, side))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(stage_channels) - 1:
                self.encoder.append(Unit([Downsample(ch)]))
                skip_channels.append(ch)
                side //= 2

        self.middle = Unit([
            ResBlock(ch, ch, emb_channels, dropout),
            AttentionBlock(ch, num_heads, cross),
            ResBlock(ch, ch, emb_channels, dropout),
        ])

        # Decoder: num_blocks + 1 units per stage, each eating one skip, so every
        # encoder output (input conv and downsamples included) is used once.
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(stage_channels))):
            out_ch = stage_channels[level]
            for i in range(num_blocks + 1):
                unit = res_unit(ch + skip_channels.pop(), out_ch, side)
                ch = out_ch
                if level and i == num_blocks:
                    unit.append(Upsample(ch))
                    side *= 2
                self.decoder.append(unit)

        self.out_norm = group_norm(ch)
        self.out_conv = nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x0_est: Tensor | None, x_t: Tensor, noise_label: Tensor) -> Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        estimate_ok = x0_est is None if self.conditioning == "none" else \
            (x0_est is not None and x0_est.shape == x_t.shape)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != expected or not estimate_ok:
            shown = None if x0_est is None else tuple(x0_est.shape)
            raise ValueError(f"x_t must be (B, {', '.join(map(str, expected))}) and x0_est "
                             f"{'None' if self.conditioning == 'none' else 'the same shape'} "
                             f"(conditioning {self.conditioning!r}), got {shown} and {tuple(x_t.shape)}")
        if noise_label.shape != (x_t.shape[0],):
            raise ValueError(f"noise_label must be ({x_t.shape[0]},), got {tuple(noise_label.shape)}")

        emb = self.noise_mlp(noise_embedding(noise_label, self.base_channels))
        context = {}
        if self.conditioning == "cross_attention":
            context = self.estimate_encoder(x0_est)
            h = self.input_conv(x_t)
        elif self.conditioning == "concat":
            h = self.input_conv(torch.cat([x0_est, x_t], dim=1))
        else:
            h = self.input_conv(x_t)

        skips = [h]
        for unit in self.encoder:
            h = unit(h, emb, context)
            skips.append(h)
        h = self.middle(h, emb, context)
        for unit in self.decoder:
            h = unit(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out_conv(F.silu(self.out_norm(h)))


def build_network(model, image_size: int, channels: int, conditioning: str) -> UNet:
    """The U-Net of params `model` (a ModelConfig) for images of `channels` x `image_size`^2."""
    return UNet(image_size=image_size, channels=channels, base_channels=model.base_channels,
                channel_mult=model.channel_mult, num_blocks=model.num_blocks,
                attn_resolutions=model.attn_resolutions, dropout=model.dropout, num_heads=model.num_heads,
                conditioning=conditioning)
