"""CLIP's text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sec. 2.4), the text tower Stable Diffusion conditions on: OpenAI's ViT-L/14 in SD v1,
OpenCLIP's ViT-H/14 (Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image
learning") in SD 2.x.

    input_ids (B, T)
      -> token embedding + learned position embedding                     (B, T, D)
      -> L pre-norm blocks: x + Attn(LN(x)) with a causal mask, then x + MLP(LN(x))
         (the GPT-2 layout the paper uses: "masked self-attention was used in the text encoder")
      -> final LayerNorm                                                   last_hidden_state (B, T, D)
      -> the row at the end token                                          pooled_output (B, D)

Stable Diffusion v1 feeds last_hidden_state (B, 77, 768) to the UNet's cross-attention. "CLIP skip k"
is `model.final_layer_norm(out.hidden_states[-k])` with output_hidden_states=True. SD 2.x feeds
(B, 77, 1024) from the "penultimate" block: OpenCLIP's tower has 24 blocks, SD 2 runs the first 23 and
then the final LayerNorm, so its text encoder is this model with 23 layers (`CLIPTextConfig.open_clip_vit_h14`,
the config diffusers writes), and exact GELU where OpenAI's CLIP has its sigmoid approximation.

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis",
sec. 2.1) runs two towers and concatenates their penultimate hidden states, `hidden_states[-2]` WITHOUT the
final LayerNorm, to (B, 77, 768 + 1280): OpenAI's ViT-L/14 (this model) and OpenCLIP's ViT-bigG/14, all 32
blocks of it (`CLIPTextConfig.open_clip_vit_bigg14`), whose pooled output, through the tower's
`text_projection` (a Linear without bias, transformers' `CLIPTextModelWithProjection`), also conditions the
UNet (`text_embeds`, (B, 1280)).

Module names follow transformers' `CLIPTextModel` keys with the `embeddings.`/`encoder.` levels
removed, so `clip/weights.py` maps a checkpoint with a handful of prefix rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.configs import TRANSFORMERS_FIXED, TRANSFORMERS_GENERIC, TRANSFORMERS_METADATA, config_from_dict
from common.files import read_json
from common.recompute import maybe_recompute

LEGACY_EOS_TOKEN_ID = 2  # see CLIPTextModel.pool


@dataclass(kw_only=True)
class CLIPTextConfig:
    vocab_size: int = 49408               # BPE vocabulary, the two special tokens last (49406, 49407)
    max_position_embeddings: int = 77     # T at most: start token + 75 tokens + end token
    hidden_size: int = 768                # D, the width of every token
    intermediate_size: int = 3072         # hidden width of each block's MLP
    num_hidden_layers: int = 12           # L, transformer blocks
    num_attention_heads: int = 12         # head width = D / heads (64 in every OpenAI CLIP)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"        # OpenAI's x * sigmoid(1.702 x); "gelu" (erf) in OpenCLIP models
    pad_token_id: int = 1                 # the ids openai/clip-vit-large-patch14's config.json gives; the
    bos_token_id: int = 0                 # tokenizer's real ids are 49407/49406/49407, and eos 2 selects
    eos_token_id: int = 2                 # the legacy pooling rule (CLIPTextModel.pool)
    projection_dim: int = 512             # CLIPTextModelWithProjection's text_projection output width

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- named presets -------------------------------------------------------------------------
    @classmethod
    def vit_l14(cls, **overrides) -> "CLIPTextConfig":
        """openai/clip-vit-large-patch14's text tower: SD v1's text encoder (123M parameters), and SDXL's first
        (its config names CLIP's 768-wide joint space, which a text encoder without projection does not use)."""
        return cls(**{"projection_dim": 768, **overrides})

    @classmethod
    def open_clip_vit_h14(cls, **overrides) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14's text tower as SD 2.x uses it: the first 23 of its 24 blocks (the penultimate
        block's output, then the final LayerNorm), width 1024, 16 heads, exact GELU (340M parameters).
        stabilityai/stable-diffusion-2-1's `text_encoder/config.json` (its token ids are SD v1's legacy ones)."""
        return cls(**{**OPEN_CLIP_VIT_H14, **overrides})

    @classmethod
    def open_clip_vit_bigg14(cls, **overrides) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14's text tower, SDXL's second text encoder (`CLIPTextModelWithProjection`): width
        1280, 20 heads, all 32 blocks, exact GELU, a 1280 x 1280 text_projection (695M parameters).
        stabilityai/stable-diffusion-xl-base-1.0's `text_encoder_2/config.json`."""
        return cls(**{**OPEN_CLIP_VIT_BIGG14, **overrides})

    # ---- the public config.json ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict, *, source: str = "CLIP text config") -> "CLIPTextConfig":
        """From transformers' CLIPTextConfig dict, or a CLIPConfig dict (its "text_config" is read; the
        rest holds the image tower and the projections, which the text encoder does not use).

        Keys that change nothing here are ignored (IGNORED_FIELDS, transformers' metadata and generic
        options), any other key we do not read is refused by name (common/configs.py); missing keys
        take transformers' CLIPTextConfig defaults, as transformers itself would.
        """
        if isinstance(config.get("text_config"), dict):
            config, source = config["text_config"], f"{source}, text_config"
        return config_from_dict(cls, config, fixed=TRANSFORMERS_FIXED, defaults=TRANSFORMERS_DEFAULTS,
                                ignored=TRANSFORMERS_METADATA + TRANSFORMERS_GENERIC + IGNORED_FIELDS, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPTextConfig":
        return cls.from_dict(read_json(path), source=str(path))


# What SD 2.x's text_encoder/config.json changes from SD v1's (open_clip's model_configs/ViT-H-14.json:
# width 1024, 16 heads, 24 layers, mlp_ratio 4, nn.GELU; SD 2 keeps 23 layers).
OPEN_CLIP_VIT_H14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                         hidden_act="gelu")

# What SDXL's text_encoder_2/config.json says (open_clip's model_configs/ViT-bigG-14.json: width 1280, 20 heads,
# 32 layers, mlp_ratio 4, embed_dim 1280).
OPEN_CLIP_VIT_BIGG14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280)

# Keys of a transformers CLIP text config that change nothing here: the initializer
# scales only matter to a freshly built model; dropout is not modelled (0.0 in the public configs, and
# off at inference anyway); `id2label`/`label2id` name classification labels a text encoder has none of.
IGNORED_FIELDS = ("initializer_factor", "initializer_range", "dropout", "attention_dropout",
                  "id2label", "label2id")

# transformers' CLIPTextConfig defaults (they fill keys an old config.json leaves out).
TRANSFORMERS_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, projection_dim=512, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, sec. 2): x * sigmoid(1.702 x).

    The checkpoints were trained with it, so the exact GELU would give (slightly) different features.
    """
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor                  # (B, T, D), after the final LayerNorm
    pooled_output: torch.Tensor                      # (B, D), last_hidden_state at the end token
    hidden_states: tuple[torch.Tensor, ...] | None   # L + 1 tensors (B, T, D): embeddings, then each block
    text_embeds: torch.Tensor | None = None          # (B, projection_dim): CLIPTextModelWithProjection only


class CLIPAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, eq. 1), with a causal mask in the text tower;
    the image tower (clip/vision_model.py) lets every token see every other (causal=False)."""

    def __init__(self, config: CLIPTextConfig, *, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(q k^T / sqrt(hd) + causal mask) v: token t attends to tokens 0..t only
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)           # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))                      # (B, T, D)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, D) -> (B, T, 4D) -> (B, T, D)


class CLIPEncoderLayer(nn.Module):
    """One pre-norm block: x + Attn(LN1(x)), then x + MLP(LN2(x)). `config`: a text or vision config."""

    def __init__(self, config: CLIPTextConfig, *, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config, causal=causal)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False   # recompute each layer in the backward pass (common/recompute.py)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (B, T), got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens; this model has "
                             f"{self.config.max_position_embeddings} positions")
        positions = torch.arange(T, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)
        hidden_states = [x]
        for layer in self.layers:
            x = maybe_recompute(layer, self.gradient_checkpointing, x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        return CLIPTextOutput(last_hidden_state=last, pooled_output=self.pool(last, input_ids),
                              hidden_states=tuple(hidden_states) if output_hidden_states else None)

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at each row's end token, (B, T, D) -> (B, D), chosen as transformers does.

        Configs written before transformers' PR #24773 (openai/clip-vit-large-patch14, SD v1) say
        eos_token_id=2, which is not CLIP's end token; for them the end token is found as the largest
        id in the row (<|endoftext|> = 49407 is the last id of the vocabulary), its first occurrence.
        Newer configs name the real end id, and the first position holding it is used.
        """
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            end = input_ids.to(torch.int).argmax(dim=-1)
        else:
            end = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # first match (0 if none)
        return last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), end]


class CLIPTextModelWithProjection(CLIPTextModel):
    """The text tower with its projection into CLIP's joint image-text space (the paper's W_t, Fig. 3's
    `np.dot(T_f, W_t)`): text_embeds = pooled_output @ W_t, a Linear without bias. SDXL's second text encoder;
    its `text_embeds` are the pooled text conditioning of the UNet's `text_time` embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        out = super().forward(input_ids, output_hidden_states=output_hidden_states)
        out.text_embeds = self.text_projection(out.pooled_output)          # (B, projection_dim)
        return out
