"""The Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), as an image classifier.

    image (B, 3, H, W)
      -> 16x16 patches, each projected to D by one strided convolution     (paper eq. 1)
      -> prepend a learned [CLS] token, add learned position embeddings     (eq. 1)
      -> L pre-norm encoder blocks: x + MSA(LN(x)), then x + MLP(LN(x))     (eq. 2, 3)
      -> final LayerNorm, read the [CLS] token, one linear layer -> logits  (eq. 4)

This is the architecture of `dima806/facial_emotions_image_detection` (transformers'
`ViTForImageClassification`) and of timm's `VisionTransformer`. The two publish the same weights
under different names; `vit/weights.py` maps both onto the names used here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.configs import TRANSFORMERS_FIXED, TRANSFORMERS_GENERIC, TRANSFORMERS_METADATA, build, check_config_keys
from common.files import read_json

# The label order of dima806/facial_emotions_image_detection (its config.json id2label).
EMOTION_LABELS = ("sad", "disgust", "angry", "neutral", "fear", "surprise", "happy")


@dataclass
class ViTConfig:
    image_size: int = 224            # side of the square image the position embeddings were trained at
    patch_size: int = 16             # side of one square patch
    num_channels: int = 3
    hidden_size: int = 768           # D, the width of every token
    num_layers: int = 12             # L, encoder blocks
    num_heads: int = 12              # attention heads; head width = D / num_heads
    mlp_size: int = 3072             # hidden width of each block's MLP
    layer_norm_eps: float = 1e-12    # transformers' ViT uses 1e-12; timm's uses 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"         # exact (erf) GELU; "gelu_tanh" for the tanh approximation
    labels: list[str] = field(default_factory=lambda: list(EMOTION_LABELS))  # index -> label

    def __post_init__(self):
        """Refuse a config the model cannot be built from, with a message naming the value."""
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads", "mlp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r}: must be an integer >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < math.inf):
            raise ValueError(f"layer_norm_eps {self.layer_norm_eps!r}: must be a positive number")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    # ---- named presets -------------------------------------------------------------------------
    @classmethod
    def b16(cls, **overrides) -> "ViTConfig":
        """ViT-B/16 at 224x224: the dima806 emotion model and google/vit-base-patch16-224-in21k."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides) -> "ViTConfig":
        """A 4-layer, 192-wide ViT for 48x48 images (FER2013's size; 6x6 patches): trains on a CPU in minutes."""
        return cls(**{**dict(image_size=48, patch_size=8, hidden_size=192, num_layers=4, num_heads=3,
                             mlp_size=768), **overrides})

    PRESETS = ("b16", "small")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ViTConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)(**overrides)

    # ---- transformers' config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "ViT config") -> "ViTConfig":
        """Read a transformers ViTConfig dict (the `config.json` of a ViT checkpoint folder). Keys that
        change nothing here are ignored (IGNORED_HF_FIELDS, transformers' metadata and generic options),
        any other key not read is refused by name (common/configs.py)."""
        d = check_config_keys(d, read=HF_FIELDS, fixed=TRANSFORMERS_FIXED, source=source,
                              ignored=TRANSFORMERS_METADATA + TRANSFORMERS_GENERIC + IGNORED_HF_FIELDS)

        def square(v, name):
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ValueError(f"{source}: non-square {name} {v} is not supported")
                v = v[0]
            try:
                return int(v)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {name} {v!r} is not an integer") from None
        labels = None
        if "id2label" in d:
            if not isinstance(d["id2label"], dict):
                raise ValueError(f"{source}: id2label must map indices to labels, not {d['id2label']!r}")
            id2label = {int(k): str(v) for k, v in d["id2label"].items()}
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"{source}: id2label indices {sorted(id2label)} are not 0 .. {len(id2label) - 1}")
            labels = [id2label[i] for i in range(len(id2label))]
        return build(cls, dict(
            image_size=square(d.get("image_size", 224), "image_size"),
            patch_size=square(d.get("patch_size", 16), "patch_size"),
            num_channels=d.get("num_channels", 3), hidden_size=d.get("hidden_size", 768),
            num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
            mlp_size=d.get("intermediate_size", 3072), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            qkv_bias=d.get("qkv_bias", True), hidden_act=d.get("hidden_act", "gelu"),
            labels=labels if labels is not None else default_labels(d.get("num_labels", 2))), source=source)

    def to_hf_dict(self) -> dict:
        """The `config.json` that transformers' `ViTForImageClassification.from_pretrained` reads."""
        return {
            "architectures": ["ViTForImageClassification"], "model_type": "vit",
            "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.num_channels,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "intermediate_size": self.mlp_size,
            "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps, "qkv_bias": self.qkv_bias,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "encoder_stride": self.patch_size, "problem_type": "single_label_classification",
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }

    @classmethod
    def from_json(cls, path: str | Path) -> "ViTConfig":
        return cls.from_hf_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


# The keys of a transformers ViT config.json that `ViTConfig.from_hf_dict` reads ...
HF_FIELDS = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "layer_norm_eps", "qkv_bias", "hidden_act", "id2label", "num_labels")
# ... and those that change nothing here: `label2id` is id2label read backwards; dropout is not modelled
# (0.0 in the public ViT configs, and off at inference anyway); the initializer scale only matters to
# a freshly built model; `encoder_stride` sizes ViTForMaskedImageModeling's decoder, and `pooler_act`,
# `pooler_output_size` ViTModel's pooler, neither of which the classifier has. (`problem_type`, which
# picks transformers' training loss, is among the generic options: train_emotion.py has its own flags.)
IGNORED_HF_FIELDS = ("label2id", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
                     "encoder_stride", "pooler_act", "pooler_output_size")


def default_labels(num_labels: int) -> list[str]:
    """The dima806 order for 7 classes, else `LABEL_i` as transformers names unnamed classes."""
    if num_labels == len(EMOTION_LABELS):
        return list(EMOTION_LABELS)
    return [f"LABEL_{i}" for i in range(num_labels)]


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                              # exact: x * Phi(x)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (paper eq. 2; Vaswani et al. eq. 1)."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # rows: [q; k; v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)         # each (B, heads, N, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)             # softmax(q k^T / sqrt(head_dim)) v
        y = y.transpose(1, 2).reshape(B, N, D)                  # (B, N, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, *, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One pre-norm encoder block (paper eq. 2 and 3)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = Attention(dim=D, num_heads=config.num_heads, qkv_bias=config.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = MLP(dim=D, hidden=config.mlp_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTForImageClassification(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D, P = config.hidden_size, config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, D, kernel_size=P, stride=P)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, D))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        # No labels: a backbone (DINO's ViT, google's in21k ViTModel), its output the [CLS] features (timm's num_classes=0)
        self.head = nn.Linear(D, config.num_labels) if config.num_labels else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated-normal(0.02) weights as transformers initialises a fresh ViT (used by new heads)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """(1, 1 + h*w, D): the learned grid, bicubically resized when the image is not the trained size.

        Same as transformers' `interpolate_pos_encoding` (DINO's recipe): the [CLS] position is kept,
        the patch grid is resized with `F.interpolate(mode="bicubic", align_corners=False)`.
        """
        h, w = height // self.config.patch_size, width // self.config.patch_size
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        side = math.isqrt(n)
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)               # (1, D, side, side)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)                     # (1, h*w, D)
        return torch.cat([cls_pos, grid], dim=1)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D) token states after the final LayerNorm."""
        B, _, H, W = pixel_values.shape
        x = self.patch_embed(pixel_values)                        # (B, D, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)                          # (B, N, D)
        cls = self.cls_token.expand(B, -1, -1)                    # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.position_embeddings(H, W)  # (B, 1 + N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, num_labels) logits, read at the [CLS] token; with no
        labels, (B, D): the [CLS] token itself after the final LayerNorm."""
        return self.head(self.forward_features(pixel_values)[:, 0])
