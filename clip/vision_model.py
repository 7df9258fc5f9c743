"""CLIP's image tower (Radford et al. 2021, sec. 2.4): a Vision Transformer with one change.

    pixel_values (B, 3, S, S)
      -> P x P patches, each projected to D by one strided convolution (no bias)    (B, N, D)
      -> prepend the class embedding, add the learned position embedding          (B, 1 + N, D)
      -> LayerNorm ("pre_layrnorm" in the file: the paper's "an additional layer normalization to the
         combined patch and position embeddings before the transformer", the one change to ViT)
      -> L pre-norm blocks: x + Attn(LN(x)), then x + MLP(LN(x)), no causal mask    last_hidden_state
      -> post LayerNorm of the class token                                          pooled_output (B, D)

The blocks are the text tower's (clip/text_model.py `CLIPEncoderLayer`: separate q/k/v projections,
quick_gelu) without its causal mask; the embedding is the ViT's (vit/model.py, paper eq. 1) with
transformers' CLIP names (a (D,) class embedding, positions as an nn.Embedding, a bias-free patch
convolution). clip/model.py adds the projection into the image-text space.

Module names follow transformers' `CLIPVisionModel` keys with the `embeddings.`/`encoder.` levels removed,
as the text tower's do; `pre_layernorm` is spelt out (the checkpoints say `pre_layrnorm`, see
clip/model_weights.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from clip.text_model import ACTIVATIONS, IGNORED_FIELDS, CLIPEncoderLayer
from common.configs import TRANSFORMERS_FIXED, TRANSFORMERS_GENERIC, TRANSFORMERS_METADATA, config_from_dict
from common.files import read_json


@dataclass(kw_only=True)
class CLIPVisionConfig:
    hidden_size: int = 768            # D, the width of every token
    intermediate_size: int = 3072     # hidden width of each block's MLP
    num_hidden_layers: int = 12       # L, transformer blocks
    num_attention_heads: int = 12     # 64-wide heads in every OpenAI CLIP
    image_size: int = 224             # side of the square input the position embeddings were trained at
    patch_size: int = 32              # P: 32 for ViT-B/32, 14 for ViT-L/14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"    # x * sigmoid(1.702 x), as the text tower

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "image_size", "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    # ---- named presets -------------------------------------------------------------------------
    @classmethod
    def vit_b32(cls, **overrides) -> "CLIPVisionConfig":
        """openai/clip-vit-base-patch32's image tower (transformers' CLIPVisionConfig defaults)."""
        return cls(**overrides)

    @classmethod
    def vit_l14(cls, **overrides) -> "CLIPVisionConfig":
        """openai/clip-vit-large-patch14's image tower: 24 blocks, 1024 wide, 14x14 patches."""
        return cls(**{**dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             patch_size=14), **overrides})

    # ---- the public config.json ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict, *, source: str = "CLIP vision config") -> "CLIPVisionConfig":
        """From transformers' CLIPVisionConfig dict, or a CLIPConfig dict (its "vision_config" is read).

        The one config policy (common/configs.py), as the text tower's: keys that change nothing here are
        ignored (clip/text_model.py IGNORED_FIELDS, transformers' metadata and generic options), any other
        key we do not read is refused by name; missing keys take transformers' CLIPVisionConfig defaults
        (ViT-B/32's), which are this class's.
        """
        if isinstance(config.get("vision_config"), dict):
            config, source = config["vision_config"], f"{source}, vision_config"
        return config_from_dict(cls, config, fixed=TRANSFORMERS_FIXED,
                                ignored=TRANSFORMERS_METADATA + TRANSFORMERS_GENERIC + IGNORED_VISION_FIELDS,
                                source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPVisionConfig":
        return cls.from_dict(read_json(path), source=str(path))


# The text tower's ignorable keys (clip/text_model.py IGNORED_FIELDS), and the token ids that transformers
# 4.x wrote into every sub-config (openai/clip-vit-large-patch14's vision_config has them): an image tower
# reads no tokens; projection_dim sizes CLIPVisionModelWithProjection's projection, read by clip/model_weights.py.
IGNORED_VISION_FIELDS = IGNORED_FIELDS + ("bos_token_id", "eos_token_id", "pad_token_id", "projection_dim")


@dataclass
class CLIPVisionOutput:
    last_hidden_state: torch.Tensor   # (B, 1 + N, D), the last block's output (no post LayerNorm)
    pooled_output: torch.Tensor       # (B, D), post_layernorm(last_hidden_state[:, 0])


class CLIPVisionModel(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        D, P = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=P, stride=P, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.position_embedding = nn.Embedding(1 + config.num_patches, D)
        self.pre_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal=False) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        B, C, H, W = pixel_values.shape
        S = self.config.image_size
        if (C, H, W) != (self.config.num_channels, S, S):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: this model takes "
                             f"(B, {self.config.num_channels}, {S}, {S})")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)                                           # (B, N, D)
        cls = self.class_embedding.expand(B, 1, -1)                                # (B, 1, D)
        positions = torch.arange(x.shape[1] + 1, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(positions)        # (B, 1 + N, D)
        x = self.pre_layernorm(x)
        for layer in self.layers:
            x = layer(x)
        return CLIPVisionOutput(last_hidden_state=x, pooled_output=self.post_layernorm(x[:, 0]))
