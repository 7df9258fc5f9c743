"""Building blocks shared by the UNet and the VAE: timestep embedding, ResNet block, down/up sampling,
and the UNet's per-resolution down, mid and up blocks.

Attribute names follow diffusers (`resnets.0.norm1`, `attentions.0`, `downsamplers.0.conv`, ...), so
the diffusers layout loads by identity and the original CompVis layout by the renaming rules in
`diffusion/checkpoints/single_file.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.recompute import maybe_recompute
from diffusion.models.attention import SpatialTransformer
from diffusion.layout import memory_format_of


def timestep_embedding(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) tensor of (possibly fractional) timesteps -> (B, dim).

    The transformer's position encoding (Vaswani et al. 2017, sec. 3.5) as used by DDPM (Ho et al.
    2020, appendix B): frequency i is max_period^(-i / (half - freq_shift)). SD v1 puts cos before
    sin (`flip_sin_to_cos`) and uses freq_shift 0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))                 # (half,)
    angles = timesteps.float()[:, None] * freqs[None, :]               # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))                                    # odd dim: one zero column


class TimestepEmbedding(nn.Module):
    """linear -> SiLU -> linear, lifting the sinusoidal code to the ResNet blocks' `temb` width."""

    def __init__(self, *, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 (+ projected timestep) -> GroupNorm -> SiLU -> dropout -> conv3x3,
    plus the input (through a 1x1 conv when the width changes). DDPM's ResNet block (Ho et al. 2020,
    appendix B), itself from Wide ResNets. The VAE uses it without a timestep (`temb_channels=None`).
    """

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int | None,
                 groups: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv: halves H and W.

    The UNet pads 1 on every side. The VAE's conv has padding 0 and pads (right 1, bottom 1) only:
    LDM's autoencoder does it that way, and the weights were trained with it.
    """

    def __init__(self, *, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv. `size` overrides 2x (to meet a skip's size).

    `subpixel=True` computes the same 2x map by `upsample2x_conv3x3` (below), without making the
    upsampled tensor; the VAE decoder uses it, the UNet does not (see that function)."""

    def __init__(self, *, channels: int, subpixel: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.subpixel = subpixel

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is not None:
            return self.conv(F.interpolate(x, size=size, mode="nearest"))
        if self.subpixel:
            return upsample2x_conv3x3(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # conv of (B, C, 2H, 2W)


# FOLD[a] turns the 3 taps of a 3x3 kernel's row (or column) into the 2 taps that output phase a sees.
FOLD = torch.tensor([[[1., 0., 0.], [0., 1., 1.]],     # a = 0: (w0, w1 + w2) on input rows (i-1, i)
                     [[1., 1., 0.], [0., 0., 1.]]])    # a = 1: (w0 + w1, w2) on input rows (i, i+1)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv3x3(nearest_2x(x)) with zero padding 1, computed on x itself: (B, C, H, W) -> (B, O, 2H, 2W).

    Output row 2i+a (a = 0 or 1) reads upsampled rows 2i+a-1, 2i+a, 2i+a+1, which are input rows
    (i-1, i, i) for a = 0 and (i, i, i+1) for a = 1: two distinct rows, so the kernel's three rows fold
    into two, (w0, w1+w2) or (w0+w1, w2). Columns fold the same way. Each of the four output phases
    (a, b) is therefore a 2x2 conv of x: 4 taps on H*W positions instead of 9 taps on 4*H*W, 2.25x fewer
    multiply-adds, and no 4x larger upsampled tensor. The four phases run as one conv with 4*O output
    channels over x padded by 1; phase (a, b) is its output shifted by (a, b). This is the sub-pixel
    convolution of Shi et al. 2016 ("Real-Time Single Image and Video Super-Resolution Using an
    Efficient Sub-Pixel Convolutional Neural Network"), read backwards from a given 3x3 kernel.

    The output comes in x's layout (see diffusion/layout.py): the phases are interleaved in memory
    order, channels-first or channels-last.

    Equal to the plain form up to rounding (the folded taps are summed first: max |diff| about 3e-6 on
    unit-scale inputs). It pays where the image is large against the weights: the VAE decoder's
    upsamplers (512 channels at 64x64 and 128x128, 256 at 256x256) ran 1.2-1.9x faster on a 2-core CPU
    in fp32 and bf16. At the UNet's 1280 channels on 8x8 and 16x16 folding the weights costs more than
    the conv saves, so the UNet keeps the plain form.
    """
    B, C, H, W = x.shape
    O = weight.shape[0]
    fold = FOLD.to(weight)
    kernels = torch.einsum("apy,ocyx,bqx->abocpq", fold, weight, fold)     # (2, 2, O, C, 2, 2): phase a, b
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels.reshape(4 * O, C, 2, 2), bias.repeat(4))  # (B, 4O, H+1, W+1)
    if memory_format_of(x) == torch.channels_last:  # interleave in memory order (B, H, W, O): no copy back
        y = y.permute(0, 2, 3, 1).reshape(B, H + 1, W + 1, 2, 2, O)
        rows = [torch.stack([y[:, a:a + H, b:b + W, a, b] for b in (0, 1)], dim=3)  # (B, H, W, 2, O): b
                for a in (0, 1)]
        out = torch.stack(rows, dim=2).reshape(B, 2 * H, 2 * W, O)                  # (B, H, 2, W, 2, O): a, b
        return out.permute(0, 3, 1, 2)                                             # (B, O, 2H, 2W) channels-last
    y = y.view(B, 2, 2, O, H + 1, W + 1)
    rows = [torch.stack([y[:, a, b, :, a:a + H, b:b + W] for b in (0, 1)], dim=-1)  # (B, O, H, W, 2): b
            for a in (0, 1)]
    return torch.stack(rows, dim=3).reshape(B, O, 2 * H, 2 * W)                   # (B, O, H, 2, W, 2): a, b


class DownBlock(nn.Module):
    """One UNet resolution on the way down: `layers` ResNet blocks, each followed by a spatial
    transformer when the level carries cross-attention ("CrossAttnDownBlock2D") or not
    ("DownBlock2D"), then a stride-2 downsampler except on the last level. Returns the output and
    every intermediate state, which the up path takes as skip connections."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 cross_attention: bool, heads: int, context_dim: int, groups: int, eps: float,
                 downsample: bool, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=temb_channels, groups=groups, eps=eps, dropout=dropout)
            for i in range(layers)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels=out_channels, heads=heads, context_dim=context_dim, norm_groups=groups,
                               dropout=dropout)
            for _ in range(layers)]) if cross_attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(channels=out_channels)]) if downsample else None
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = maybe_recompute(resnet, self.gradient_checkpointing, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: ResNet, spatial transformer, ResNet ("UNetMidBlock2DCrossAttn")."""

    def __init__(self, *, channels: int, temb_channels: int, heads: int, context_dim: int, groups: int,
                 eps: float, dropout: float = 0.0):
        super().__init__()
        kw = dict(in_channels=channels, out_channels=channels, temb_channels=temb_channels, groups=groups,
                  eps=eps, dropout=dropout)
        self.resnets = nn.ModuleList([ResnetBlock2D(**kw), ResnetBlock2D(**kw)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels=channels, heads=heads, context_dim=context_dim, norm_groups=groups,
                               dropout=dropout)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = maybe_recompute(self.resnets[0], self.gradient_checkpointing, x, temb)
        x = self.attentions[0](x, context)
        return maybe_recompute(self.resnets[1], self.gradient_checkpointing, x, temb)


class UpBlock(nn.Module):
    """One UNet resolution on the way up: `layers + 1` ResNet blocks, each fed the previous output
    concatenated (on channels) with one skip from the down path, latest skip first; optional spatial
    transformers ("CrossAttnUpBlock2D" vs "UpBlock2D"); then a 2x upsampler except on the last level.

    `skip_channels[i]` is the width of the skip that ResNet i receives.
    """

    def __init__(self, *, in_channels: int, out_channels: int, skip_channels: list[int], temb_channels: int,
                 cross_attention: bool, heads: int, context_dim: int, groups: int, eps: float,
                 upsample: bool, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=(in_channels if i == 0 else out_channels) + skip,
                          out_channels=out_channels, temb_channels=temb_channels, groups=groups, eps=eps,
                          dropout=dropout)
            for i, skip in enumerate(skip_channels)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels=out_channels, heads=heads, context_dim=context_dim, norm_groups=groups,
                               dropout=dropout)
            for _ in skip_channels]) if cross_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(channels=out_channels)]) if upsample else None
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """`skips` is the UNet's stack of down-path outputs: each ResNet pops the latest one."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = maybe_recompute(resnet, self.gradient_checkpointing, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            # to the size of the skip the next block concatenates first (2x for the sizes the UNet takes)
            x = self.upsamplers[0](x, tuple(skips[-1].shape[-2:]))
        return x
