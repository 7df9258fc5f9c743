"""The Stable Diffusion noise-prediction UNet (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"; the UNet of Ho et al. 2020 with spatial transformers).

Given noisy latents x_t, the timesteps t (one per batch item) and the CLIP text states c, it predicts
the noise eps_theta(x_t, t, c) of DDPM eq. 14 (SD 2.x's 768x768 models: v, see diffusion/schedule.py).
Shape of the network (SD v1 numbers):

    conv_in 4->320 at 64x64
    down: 320 (64x64) -> 640 (32x32) -> 1280 (16x16) -> 1280 (8x8), 2 ResNets per level,
          spatial transformers on the first three levels, stride-2 conv between levels
    mid:  ResNet, transformer, ResNet at 8x8
    up:   the mirror image, 3 ResNets per level, each eating one skip connection
    conv_out 320->4

SD 2.x is the same network with four differences, each a config field (`UNetConfig.sd_v2`): the
spatial transformers project in and out with Linear layers (`use_linear_projection`), the heads are
64 wide (`attention_head_dim` 5, 10, 20, 20 heads per level), the text states are 1024 wide
(`cross_attention_dim`, OpenCLIP ViT-H/14), and SD 2.1's 768x768 model computes attention in fp32
when run in half precision (`upcast_attention`).

SDXL (Podell et al. 2023, sec. 2.1 and 2.2; `UNetConfig.sdxl`) has three levels, 320, 640, 1280, no
attention at the first, 1, 2 and 10 transformer blocks in each spatial transformer of the others
(`transformer_layers_per_block`; the mid block takes the last level's), 2048-wide text states (two text
encoders concatenated), and "micro-conditioning" (`addition_embed_type: text_time`): the original image
size, the crop's top-left corner and the target size, six numbers per image (`time_ids`), each as sinusoidal
features like a timestep's, concatenated after the pooled text embedding of the second text encoder
(`text_embeds`) and lifted by `add_embedding` (linear, SiLU, linear) onto the timestep embedding, which every
ResNet reads.

Module attributes carry diffusers' key names, so a diffusers `unet/` folder loads by identity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.configs import DIFFUSERS_METADATA, config_from_dict
from common.files import read_json
from diffusion.models.unet_blocks import DownBlock, MidBlock, TimestepEmbedding, UpBlock, timestep_embedding

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers `unet/config.json` fields this implementation does not model, with the only value it
# accepts (SD v1's and SD 2.x's). A config that sets one of them to anything else is refused by name,
# instead of silently building a different network (common/configs.py: the policy every config is read by).
SD_V1_ONLY_FIELDS = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


# What stabilityai/stable-diffusion-2-1's unet/config.json changes from SD v1's, and what its -base
# (512x512, epsilon-prediction) changes from that.
SD_V2 = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
             upcast_attention=True, sample_size=96)
SD_V2_BASE = dict(sample_size=64, upcast_attention=False)
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.6B parameters): 2816 = 1280 (the pooled text
# embedding of OpenCLIP ViT-bigG/14) + 6 x 256 (the six size and crop numbers).
SDXL = dict(block_out_channels=(320, 640, 1280), down_block_types=(PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN),
            up_block_types=(CROSS_UP, CROSS_UP, PLAIN_UP), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)
TEXT_TIME = "text_time"
TIME_IDS = 6              # original (h, w), crop top-left (top, left), target (h, w)   # the one addition_embed_type modelled: SDXL's (None: no added embedding)


@dataclass
class UNetConfig:
    in_channels: int = 4                       # latent channels in
    out_channels: int = 4                      # predicted noise channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per resolution level
    layers_per_block: int = 2                  # ResNets per level going down (up: one more)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    # Despite its name, SD v1 (and diffusers, for backward compatibility) reads this as the NUMBER of
    # attention heads, not their width: 8 heads at every level, so 40/80/160-wide heads. An int for
    # all levels or one value per level: SD 2.x's (5, 10, 20, 20) heads are 64 wide at every level.
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768             # width of the text states (CLIP ViT-L/14: 768; SD 2.x: 1024)
    use_linear_projection: bool = False        # SD 2.x: Linear proj_in/proj_out on tokens, not 1x1 convs
    upcast_attention: bool | None = False      # SD 2.1 (768): attention in fp32 under half precision (SDXL: null)
    transformer_layers_per_block: int | tuple[int, ...] = 1   # transformer blocks per spatial transformer, per level
    addition_embed_type: str | None = None     # SDXL: "text_time", the micro-conditioning (module docstring)
    addition_time_embed_dim: int | None = None               # sinusoidal features per size/crop number (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding's input: pooled text + 6 x the above
    norm_num_groups: int = 32                  # GroupNorm groups in every ResNet / transformer
    norm_eps: float = 1e-5                     # GroupNorm eps of the ResNets and the output norm
    flip_sin_to_cos: bool = True               # timestep embedding as [cos, sin]
    freq_shift: float = 0                      # see `timestep_embedding`
    sample_size: int = 64                      # latent size it was trained at (512 px / 8); informative
    dropout: float = 0.0

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            types = getattr(self, name)
            allowed = (CROSS_DOWN, PLAIN_DOWN) if name == "down_block_types" else (CROSS_UP, PLAIN_UP)
            if len(types) != n or any(t not in allowed for t in types):
                raise ValueError(f"{name}={types!r}: need {n} entries out of {allowed}")
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != n:
                raise ValueError(f"{name}={value!r}: need one int or {n}")
        if self.addition_embed_type not in (None, TEXT_TIME):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported (this implementation "
                             f"has None and {TEXT_TIME!r}, SDXL's)")
        if self.addition_embed_type == TEXT_TIME and not (self.addition_time_embed_dim and
                                                          self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    @classmethod
    def sd_v1(cls) -> "UNetConfig":
        """runwayml/stable-diffusion-v1-5 and CompVis/stable-diffusion-v1-4 (`unet/config.json`)."""
        return cls()

    @classmethod
    def sd_v2(cls, **overrides) -> "UNetConfig":
        """stabilityai/stable-diffusion-2-1 (`unet/config.json`): the 768x768 v-prediction model.
        `sd_v2(**SD_V2_BASE)` is stable-diffusion-2-1-base (512x512, epsilon)."""
        return cls(**{**SD_V2, **overrides})

    @classmethod
    def sdxl(cls, **overrides) -> "UNetConfig":
        """stabilityai/stable-diffusion-xl-base-1.0 (`unet/config.json`)."""
        return cls(**{**SDXL, "upcast_attention": None, **overrides})

    def heads(self, level: int) -> int:
        h = self.attention_head_dim
        return h if isinstance(h, int) else h[level]

    def depth(self, level: int) -> int:
        """Transformer blocks in each spatial transformer of down level `level` (and of its up mirror)."""
        d = self.transformer_layers_per_block
        return d if isinstance(d, int) else d[level]

    @property
    def pooled_text_dim(self) -> int | None:
        """The width of `text_embeds` a text_time UNet reads (SDXL: 1280), else None."""
        if self.addition_embed_type != TEXT_TIME:
            return None
        return self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim

    @classmethod
    def from_dict(cls, config: dict, *, source: str = "unet config") -> "UNetConfig":
        return config_from_dict(cls, config, fixed=SD_V1_ONLY_FIELDS, ignored=DIFFUSERS_METADATA, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "UNetConfig":
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


class UNet2DConditionModel(nn.Module):
    def __init__(self, *, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        temb_dim = 4 * ch[0]
        common = dict(temb_channels=temb_dim, context_dim=config.cross_attention_dim,
                      groups=config.norm_num_groups, eps=config.norm_eps, dropout=config.dropout,
                      linear_projection=config.use_linear_projection, upcast_attention=bool(config.upcast_attention))
        n = len(ch)

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(in_dim=ch[0], dim=temb_dim)
        # SDXL's micro-conditioning: [text_embeds, sinusoids of the 6 time ids] -> temb width (diffusers' names)
        self.add_embedding = (TimestepEmbedding(in_dim=config.projection_class_embeddings_input_dim, dim=temb_dim)
                              if config.addition_embed_type == TEXT_TIME else None)

        skip_channels = [ch[0]]  # widths of the skip connections in the order the down path makes them
        self.down_blocks = nn.ModuleList()
        for level in range(n):
            last = level == n - 1
            self.down_blocks.append(DownBlock(
                in_channels=ch[max(level - 1, 0)], out_channels=ch[level], layers=config.layers_per_block,
                cross_attention=config.down_block_types[level] == CROSS_DOWN, heads=config.heads(level),
                depth=config.depth(level), downsample=not last, **common))
            skip_channels += [ch[level]] * (config.layers_per_block + (0 if last else 1))

        self.mid_block = MidBlock(channels=ch[-1], heads=config.heads(n - 1), depth=config.depth(n - 1), **common)

        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for i in range(n):
            level = n - 1 - i  # up block i works at the resolution of down level n-1-i
            skips = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(
                in_channels=prev, out_channels=ch[level], skip_channels=skips,
                cross_attention=config.up_block_types[i] == CROSS_UP, heads=config.heads(level),
                depth=config.depth(level), upsample=level > 0, **common))
            prev = ch[level]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, kernel_size=3, padding=1)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.mid_block.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = bool(on)                  # its ResNets
            for attention in block.attentions or []:
                attention.gradient_checkpointing = bool(on)          # its transformer blocks

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each ResNet and transformer block in the backward pass instead of storing activations."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, *,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, C, H, W) noisy latents, timesteps (B,) float or int, encoder_hidden_states
        (B, T, D) text states -> predicted noise (B, C, H, W). H and W must be multiples of
        2 ** (levels - 1). A text_time UNet (SDXL) also takes text_embeds (B, P), the pooled text
        embedding, and time_ids (B, 6): original height, width, crop top, left, target height, width
        (diffusers' `added_cond_kwargs`); any other UNet takes neither."""
        B = sample.shape[0]
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = timesteps.reshape(1).expand(B)  # one timestep for the whole batch
        if timesteps.shape != (B,):
            raise ValueError(f"timesteps of shape {tuple(timesteps.shape)} for a batch of {B}: expected ({B},)")

        t_emb = timestep_embedding(timesteps, self.config.block_out_channels[0],
                                   flip_sin_to_cos=self.config.flip_sin_to_cos,
                                   freq_shift=self.config.freq_shift).to(sample.dtype)  # (B, 320)
        temb = self.time_embedding(t_emb)                                                # (B, 1280)
        if (self.add_embedding is None) != (text_embeds is None and time_ids is None):
            raise ValueError("text_embeds and time_ids are SDXL's micro-conditioning: given exactly when the UNet's "
                             f"addition_embed_type is {TEXT_TIME!r} (here {self.config.addition_embed_type!r})")
        if self.add_embedding is not None:
            time_embeds = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim,
                                             flip_sin_to_cos=self.config.flip_sin_to_cos,
                                             freq_shift=self.config.freq_shift).reshape(B, -1)  # (B, 6 * 256)
            added = torch.cat([text_embeds, time_embeds], dim=-1).to(temb.dtype)        # (B, 1280 + 1536)
            temb = temb + self.add_embedding(added)                                      # SDXL sec. 2.2
        context = encoder_hidden_states

        x = self.conv_in(sample)                                                         # (B, 320, H, W)
        skips = [x]                      # a stack: the down path pushes every output, the up path pops them
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)                                             # (B, 1280, H/8, W/8)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)          # each of its ResNets pops one skip, latest first
        return self.conv_out(F.silu(self.conv_norm_out(x)))                              # (B, 4, H, W)
