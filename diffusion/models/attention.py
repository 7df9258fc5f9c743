"""The UNet's spatial transformer: self-attention, cross-attention to the text, GEGLU feed-forward.

Latent Diffusion (Rombach et al. 2022, sec. 3.3) conditions the UNet on text by inserting, after
ResNet blocks, a transformer over the H*W pixels of the feature map whose cross-attention reads the
CLIP token states. Attribute names follow diffusers' `Transformer2DModel` / `BasicTransformerBlock`
/ `Attention`, so a diffusers `unet/` file loads into this module with no renaming at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.recompute import maybe_recompute


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, eq. 1): softmax(Q K^T / sqrt(d)) V per head.

    Self-attention when `context` is None, cross-attention to `context` (the text states) otherwise.
    q/k/v carry no bias in SD v1; the output projection does. `to_out` is a list (projection,
    dropout) because that is how the checkpoints name it: `to_out.0.weight`.

    `upcast` (the UNet config's `upcast_attention`, set by SD 2.1's 768x768 model): with half-precision
    activations (fp16/bf16 weights, or autocast) the scores q k^T / sqrt(d), their softmax and the
    product with v are computed in fp32 and the result rounded back. SD 2.1's scores overflow fp16 (65504)
    and gave NaN images without it. diffusers' eager processor upcasts q and k and rounds the
    probabilities back before multiplying by v; one fp32 `scaled_dot_product_attention` call keeps the
    fused kernels' memory linear in the number of tokens (the eager form holds (B, h, HW, HW) fp32 scores:
    3.4 GB for one 768x768 CFG step), and rounds once instead of twice. fp32 activations: no change.
    """

    def __init__(self, *, query_dim: int, context_dim: int | None, heads: int, head_dim: int,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, T, _ = x.shape
        S = context.shape[1]
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)        # (B, h, T, d)
        k = self.to_k(context).view(B, S, self.heads, -1).transpose(1, 2)  # (B, h, S, d)
        v = self.to_v(context).view(B, S, self.heads, -1).transpose(1, 2)  # (B, h, S, d)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)   # in fp32
        else:
            out = F.scaled_dot_product_attention(q, k, v)                  # (B, h, T, d), scale 1/sqrt(d)
        out = out.transpose(1, 2).reshape(B, T, -1)                        # (B, T, h*d)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5):
    one projection makes both halves, the output is value * GELU(gate). Exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> dropout -> linear, with the hidden width 4x the model width. Keys: `ff.net.{0,2}`."""

    def __init__(self, *, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward,
    each with a residual connection (LDM's `BasicTransformerBlock`)."""

    def __init__(self, *, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0,
                 upcast_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, context_dim=None, heads=heads, head_dim=head_dim, dropout=dropout,
                               upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(query_dim=dim, context_dim=context_dim, heads=heads, head_dim=head_dim,
                               dropout=dropout, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim=dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def channels_first(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The spatial transformer's map as diffusers hands it to proj_out: contiguous, channels-first."""
    return h.contiguous()


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the H*W positions, 1x1 conv out, residual.

    (diffusers calls this `Transformer2DModel`.) SD v1 projects in and out with 1x1 convolutions on
    the map; SD 2.x (`linear_projection`, the config's `use_linear_projection`; LDM's
    `use_linear_in_transformer`) with Linear layers on the tokens, the same map per pixel but stored
    (C, C) instead of (C, C, 1, 1), and applied after the map becomes tokens (in) and before it becomes
    a map again (out). The GroupNorm's eps is 1e-6 whatever the UNet's `norm_eps` says: LDM hard-codes
    it and diffusers follows.
    """

    NORM_EPS = 1e-6

    def __init__(self, *, channels: int, heads: int, context_dim: int, norm_groups: int,
                 depth: int = 1, dropout: float = 0.0, linear_projection: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=self.NORM_EPS)
        projection = (lambda: nn.Linear(channels, channels)) if linear_projection else (
            lambda: nn.Conv2d(channels, channels, kernel_size=1))
        self.proj_in = projection()
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(dim=channels, heads=heads, head_dim=channels // heads,
                                  context_dim=context_dim, dropout=dropout, upcast_attention=upcast_attention)
            for _ in range(depth)])
        self.proj_out = projection()
        # Checkpointing recomputes the transformer blocks only, as diffusers does: the GroupNorm and
        # 1x1 projections around them are cheap to store and would cost a recompute each.
        self.gradient_checkpointing = False
        # How the map is stored for proj_out: channels-first, as diffusers' does. A seam for
        # diffusion/speed.py, which keeps a channels-last UNet's map as its tokens already hold it (no
        # copy); the same numbers either way.
        self.arrange_map = channels_first

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)                                      # 1x1 conv on the map (SD v1)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C).contiguous()  # (B, HW, C): one token per pixel
        if self.linear_projection:
            h = self.proj_in(h)                                      # Linear on the tokens (SD 2.x)
        for block in self.transformer_blocks:
            h = maybe_recompute(block, self.gradient_checkpointing, h, context)
        if self.linear_projection:
            h = self.proj_out(h)
            return x + self.arrange_map(h.reshape(B, H, W, C).permute(0, 3, 1, 2), x)   # (B, C, H, W)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)                # (B, C, H, W)
        return x + self.proj_out(self.arrange_map(h, x))
