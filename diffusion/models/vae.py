"""The SD v1 autoencoder (AutoencoderKL): images <-> latents, 8x smaller in each side, 4 channels.

Latent Diffusion (Rombach et al. 2022, sec. 3.1 and appendix G) trains a convolutional VAE with a
small KL penalty; the diffusion model then runs on its latents. The encoder gives a diagonal
Gaussian posterior q(z|x) = N(mean, std^2) (Kingma & Welling 2014, sec. 2.4); sampling is the
reparameterisation z = mean + std * noise.

Two things here are NOT done inside the model, on purpose:
- the latent scale (`VAEConfig.scaling_factor`, 0.18215 for SD v1, chosen by LDM so the latents have
  about unit variance) is applied by the caller: z_diffusion = scaling_factor * z_vae;
- nothing is edited in place, so the caller's tensors never change.

Attribute names are diffusers', so a diffusers `vae/` folder loads by identity; the original
checkpoint's names (and its 1x1-conv attention weights) are mapped in `diffusion/checkpoints/single_file.py`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.configs import DIFFUSERS_METADATA, config_from_dict
from common.files import read_json
from diffusion.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
RESNET_EPS = 1e-6  # every GroupNorm of LDM's autoencoder uses eps 1e-6 (diffusers follows)

SD_V1_ONLY_FIELDS = {  # diffusers `vae/config.json` fields accepted only at SD v1's value (common/configs.py)
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


@dataclass
class VAEConfig:
    in_channels: int = 3                        # image channels
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN, DOWN, DOWN, DOWN)
    up_block_types: tuple[str, ...] = (UP, UP, UP, UP)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder width per level (decoder mirrors)
    layers_per_block: int = 2                   # ResNets per encoder level (decoder: one more)
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512                      # image size it was trained at; informative
    scaling_factor: float = 0.18215             # latent scale, applied by the caller (see module doc); SDXL 0.13025
    force_upcast: bool = True                   # SDXL's pipeline decodes an fp16 VAE in fp32 (its fp16 overflows)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if tuple(self.down_block_types) != (DOWN,) * n or tuple(self.up_block_types) != (UP,) * n:
            raise ValueError(f"down/up_block_types must be {n} x {DOWN!r} / {UP!r}, got "
                             f"{self.down_block_types!r} / {self.up_block_types!r}")

    @classmethod
    def sd_v1(cls) -> "VAEConfig":
        """runwayml/stable-diffusion-v1-5's `vae/config.json`."""
        return cls()

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """stabilityai/stable-diffusion-xl-base-1.0's `vae/config.json`: SD v1's architecture, retrained, with its
        own latent scale; its activations overflow fp16, hence force_upcast."""
        return cls(scaling_factor=0.13025, sample_size=1024)

    @property
    def spatial_factor(self) -> int:
        """How much smaller a latent is than its image in each side: one halving per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict, *, source: str = "vae config") -> "VAEConfig":
        return config_from_dict(cls, config, fixed=SD_V1_ONLY_FIELDS, ignored=DIFFUSERS_METADATA, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(std^2)), from the encoder's 2*latent_channels moments (mean, log variance)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments                          # (B, 2L, h, w): what the encoder gave
        self.mean, logvar = moments.chunk(2, dim=1)     # (B, L, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)         # as LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None, *,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + std * noise, with `noise` (B, L, h, w) ~ N(0, I) drawn by `draw` from `generator`
        unless it is given (a reference's own draw, say), then taken in the moments' dtype as diffusers'."""
        noise = self.draw(generator) if noise is None else noise
        return self.mean + self.std * noise.to(self.mean)

    def draw(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The noise of a sample, drawn exactly as diffusers draws it: one randn of the latent shape on the
        generator's device, in the moments' dtype, then moved to their device. With a list of generators,
        one per row, row i's noise is a (1, L, h, w) draw from generator i (as if each image had been
        encoded alone)."""
        if isinstance(generator, (list, tuple)):
            return torch.cat([self._noise(g, (1, *self.mean.shape[1:])) for g in generator])
        return self._noise(generator, self.mean.shape)

    def _noise(self, generator: torch.Generator | None, shape: tuple[int, ...]) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device
        return torch.randn(shape, generator=generator, device=device, dtype=self.mean.dtype).to(self.mean.device)


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W pixels with a GroupNorm in front and a residual.
    The original checkpoint stores q/k/v/proj as 1x1 convolutions; they are the same linear maps."""

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=RESNET_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)     # (B, HW, C)
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]               # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)      # (B, C, H, W)
        return x + h


class VAEMidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        kw = dict(in_channels=channels, out_channels=channels, temb_channels=None, groups=groups, eps=RESNET_EPS)
        self.resnets = nn.ModuleList([ResnetBlock2D(**kw), ResnetBlock2D(**kw)])
        self.attentions = nn.ModuleList([VAEAttention(channels=channels, groups=groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def resnet_stack(*, in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    """`layers` ResNet blocks without a timestep input, the first changing the width."""
    return nn.ModuleList([ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                                        temb_channels=None, groups=groups, eps=RESNET_EPS) for i in range(layers)])


class DownEncoderBlock(nn.Module):
    """One resolution of the encoder (diffusers' DownEncoderBlock2D): ResNets, then a stride-2
    downsampler, except on the last level."""

    def __init__(self, *, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels=in_channels, out_channels=out_channels, layers=layers, groups=groups)
        self.downsamplers = (nn.ModuleList([Downsample2D(channels=out_channels, asymmetric_pad=True)])
                             if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nn.Module):
    """One resolution of the decoder (diffusers' UpDecoderBlock2D): ResNets, then a 2x upsampler,
    except on the last level."""

    def __init__(self, *, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels=in_channels, out_channels=out_channels, layers=layers, groups=groups)
        self.upsamplers = nn.ModuleList([Upsample2D(channels=out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """(B, 3, H, W) image in [-1, 1] -> (B, 2L, H/f, W/f) moments (mean and log variance)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], layers=config.layers_per_block,
                             groups=g, downsample=i < n - 1) for i in range(n)])
        self.mid_block = VAEMidBlock(channels=ch[-1], groups=g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)                    # halves H, W on every level but the last
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, L, h, w) latents -> (B, 3, h*f, w*f) image, roughly in [-1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g, n = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], kernel_size=3, padding=1)
        self.mid_block = VAEMidBlock(channels=ch[0], groups=g)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], layers=config.layers_per_block + 1,
                           groups=g, upsample=i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)                    # doubles H, W on every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, *, config: VAEConfig):
        super().__init__()
        self.config = config
        L = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, kernel_size=1)   # 1x1 convs around the latent space
        self.post_quant_conv = nn.Conv2d(L, L, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) image in [-1, 1] -> posterior over (B, L, H/f, W/f) unscaled latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) unscaled latents (divide the diffusion latents by `scaling_factor` first)
        -> (B, 3, h*f, w*f) image, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x).sample(generator))
