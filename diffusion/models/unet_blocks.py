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
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (LDM's `Upsample`, diffusers' `Upsample2D`).
    `size` overrides 2x, to meet a skip connection's size."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """One UNet resolution on the way down: `layers` ResNet blocks, each followed by a spatial
    transformer when the level carries cross-attention ("CrossAttnDownBlock2D") or not
    ("DownBlock2D"), then a stride-2 downsampler except on the last level. Returns the output and
    every intermediate state, which the up path takes as skip connections."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 cross_attention: bool, heads: int, context_dim: int, groups: int, eps: float,
                 downsample: bool, dropout: float = 0.0, linear_projection: bool = False,
                 upcast_attention: bool = False, depth: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=temb_channels, groups=groups, eps=eps, dropout=dropout)
            for i in range(layers)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels=out_channels, heads=heads, context_dim=context_dim, norm_groups=groups,
                               dropout=dropout, linear_projection=linear_projection,
                               upcast_attention=upcast_attention, depth=depth)
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
                 eps: float, dropout: float = 0.0, linear_projection: bool = False,
                 upcast_attention: bool = False, depth: int = 1):
        super().__init__()
        kw = dict(in_channels=channels, out_channels=channels, temb_channels=temb_channels, groups=groups,
                  eps=eps, dropout=dropout)
        self.resnets = nn.ModuleList([ResnetBlock2D(**kw), ResnetBlock2D(**kw)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels=channels, heads=heads, context_dim=context_dim, norm_groups=groups,
                               dropout=dropout, linear_projection=linear_projection,
                               upcast_attention=upcast_attention, depth=depth)])
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
                 upsample: bool, dropout: float = 0.0, linear_projection: bool = False,
                 upcast_attention: bool = False, depth: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=(in_channels if i == 0 else out_channels) + skip,
                          out_channels=out_channels, temb_channels=temb_channels, groups=groups, eps=eps,
                          dropout=dropout)
            for i, skip in enumerate(skip_channels)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels=out_channels, heads=heads, context_dim=context_dim, norm_groups=groups,
                               dropout=dropout, linear_projection=linear_projection,
                               upcast_attention=upcast_attention, depth=depth)
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
