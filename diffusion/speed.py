"""The speed transformations, applied to built models: the one place where the UNet and VAE stop
reading as the papers.

`diffusion/models/` is the plain reference path: channels-first, nearest-2x upsampling then a 3x3 conv,
as LDM and diffusers write it. `arrange_for_speed(models, device=..., precision=...)` rewrites and
configures a built model, in place, for the speed measured below; sample.py, train_dreambooth.py
(dreambooth/steps.py) and the benches call it. Every transformation gives the plain path's numbers up
to rounding (fp32: max |diff| <= 1e-5 on the tiny fixtures; tests/test_speed.py checks each one alone),
and leaves the state_dict keys as they were, so saving and loading do not know it happened.

The transformations, each with the gain measured on a 2-core AMX CPU with full-size SD v1 (bench/sd.py
and bench/train_sd.py; the machine is shared, so these are medians of alternating runs):

1. Sub-pixel VAE upsamplers (`SubpixelUpsample2D`, every device and precision). conv3x3(nearest_2x(x))
   computed as four 2x2 convolutions of x itself (`upsample2x_conv3x3`): 2.25x fewer multiply-adds and
   no 4x larger upsampled tensor. The decoder's upsamplers ran 1.2-1.9x faster alone; a whole 512x512
   VAE decode went from 0.98x to 1.07x diffusers' speed in fp32 and from 1.06x to 1.14x in bf16, with
   lower peak memory. The UNet keeps the plain form: at its 1280 channels on 8x8 and 16x16 maps,
   folding the weights costs more than the smaller conv saves.

2. Channels-last memory layout (`CPU_CHANNELS_LAST`, a CPU only). A (B, C, H, W) tensor means the same
   numbers in either layout; in channels-last the C values of one pixel sit side by side, the order in
   which oneDNN's bf16 convolutions ran fastest here and the order the spatial transformer's tokens
   already have (one token per pixel). Time channels-first / channels-last, our own model both ways:
       UNet CFG step at 512x512       bf16 1.29x   fp32 0.97x (no gain: it stays channels-first)
       UNet training step (train_sd)  bf16 1.35x
       VAE decode at 512x512          bf16 1.50x   fp32 1.15x
   fp16 on a CPU, and every GPU, are unmeasured here: they stay channels-first.

3. No layout mix inside a model (always). oneDNN answers a channels-last input with a channels-last
   output even when the weights are channels-first, so one map in the other layout carries that layout
   onward, and a model running half in each layout was slower than either (the bf16 CFG UNet step at
   0.89x diffusers' against 0.97x, when the spatial transformer's output spread its layout). Two things
   keep every map in the weights' layout:
   - `take_inputs_in_weights_layout`: a forward pre-hook on each model's first conv (`conv_in`) stores
     the caller's latents or image in the layout of the conv's weights (no copy when they already are):
     the channel slice that a channels-last VAE's posterior mean is, say, would otherwise carry its
     layout into a channels-first UNet;
   - `keep_the_layout_in_spatial_transformers`: the spatial transformer hands its map back in its
     input's layout (it sets the plain module's `arrange_map` seam; the one forward stays the one a
     reader reads). The plain one ends as diffusers' does, with `.contiguous()` (channels-first); in a
     channels-last UNet that is a transposing copy to channels-first and, in the next conv, another
     back: 32 copies per SD v1 UNet call at 512x512, which took 0.62-0.66 s in bf16 (the copies alone,
     timed on this shared machine under load). Channels-last, its tokens are already the map in
     memory order, and nothing is copied.
   tests/test_sd_models.py hooks every conv and GroupNorm of arranged models and checks that none sees
   the other layout.

One speed choice stays in the plain model because it is a single `.contiguous()`: the spatial
transformer copies its tokens into (B, HW, C) order before the transformer blocks. Left as a strided
view, every LayerNorm and residual add of the blocks ran strided (the bf16 CFG UNet step 0.93x
diffusers' without the copy, 1.22x with it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models.attention import SpatialTransformer
from diffusion.models.unet_blocks import Upsample2D

LAYOUTS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last}  # name -> format

# Where channels-last pays (table 2 above): model -> the precisions in which it runs channels-last on a CPU.
CPU_CHANNELS_LAST = {"unet": ("bf16",), "vae": ("fp32", "bf16")}


def arrange_for_speed(models, *, device: torch.device, precision: str) -> dict[str, str]:
    """Apply every transformation above, in place, to `models.unet` and `models.vae` (either may be
    absent: the benches pass one) for `device` and `precision` ("fp32", "bf16", "fp16"); calling it
    again only changes the layout. Returns the layouts chosen, e.g. {"unet": "channels_first",
    "vae": "channels_last"}, which sample.py and train_dreambooth.py record in run_info.json."""
    chosen = {}
    for name in ("unet", "vae"):
        model = getattr(models, name, None)
        if model is None:
            continue
        if name == "vae":
            use_subpixel_upsamplers(model.decoder)
        memory_format = fastest_memory_format(name, device=device, precision=precision)
        model.to(memory_format=memory_format)
        take_inputs_in_weights_layout(model)
        keep_the_layout_in_spatial_transformers(model)
        chosen[name] = next(layout for layout, fmt in LAYOUTS.items() if fmt == memory_format)
    return chosen


# ---- 1. the sub-pixel upsampler --------------------------------------------------------------------
class SubpixelUpsample2D(nn.Module):
    """`Upsample2D` (nearest 2x, then `conv`) computed by `upsample2x_conv3x3`: the same map without
    the upsampled tensor. It holds the plain module's own `conv`, so the keys stay `upsamplers.0.conv.*`."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, size=size, mode="nearest"))  # not 2x: the plain form
        return upsample2x_conv3x3(x, self.conv.weight, self.conv.bias)


def use_subpixel_upsamplers(module: nn.Module) -> int:
    """Swap every `Upsample2D` inside `module` for a `SubpixelUpsample2D` holding the same conv.
    Returns how many were swapped (0 when done before)."""
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is Upsample2D]
    for parent, name, child in swaps:
        parent.register_module(name, SubpixelUpsample2D(child.conv))
    return len(swaps)


# FOLD[a] turns the 3 taps of a 3x3 kernel's row (or column) into the 2 taps that output phase a sees.
FOLD = torch.tensor([[[1., 0., 0.], [0., 1., 1.]],     # a = 0: (w0, w1 + w2) on input rows (i-1, i)
                     [[1., 1., 0.], [0., 0., 1.]]])    # a = 1: (w0 + w1, w2) on input rows (i, i+1)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv3x3(nearest_2x(x)) with zero padding 1, computed on x itself: (B, C, H, W) -> (B, O, 2H, 2W).

    Output row 2i+a (a = 0 or 1) reads upsampled rows 2i+a-1, 2i+a, 2i+a+1, which are input rows
    (i-1, i, i) for a = 0 and (i, i, i+1) for a = 1: two distinct rows, so the kernel's three rows fold
    into two, (w0, w1+w2) or (w0+w1, w2). Columns fold the same way. Each of the four output phases
    (a, b) is therefore a 2x2 conv of x: 4 taps on H*W positions instead of 9 taps on 4*H*W. The four
    phases run as one conv with 4*O output channels over x padded by 1; phase (a, b) is its output
    shifted by (a, b). This is the sub-pixel convolution of Shi et al. 2016 ("Real-Time Single Image and
    Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network"), read backwards
    from a given 3x3 kernel.

    The output comes in x's layout: the phases are interleaved in memory order, channels-first or
    channels-last. Equal to the plain form up to rounding (the folded taps are summed first: max |diff|
    about 3e-6 on unit-scale inputs).
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


# ---- 2. the memory layout --------------------------------------------------------------------------
def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last if the (B, C, H, W) tensor x is stored channels-last, else contiguous_format.
    (A map with C == 1 or H == W == 1 is both; it counts as channels-first.)"""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def fastest_memory_format(model: str, *, device: torch.device, precision: str) -> torch.memory_format:
    """The layout, by table 2 above, in which `model` ("unet" or "vae") runs fastest."""
    fast = device.type == "cpu" and precision in CPU_CHANNELS_LAST[model]
    return torch.channels_last if fast else torch.contiguous_format


# ---- 3. no layout mix ------------------------------------------------------------------------------
def _input_in_weights_layout(conv: nn.Conv2d, args: tuple) -> tuple:
    """Forward pre-hook: the conv's input stored in the layout of its weight (no copy when it is)."""
    return (args[0].contiguous(memory_format=memory_format_of(conv.weight)), *args[1:])


def take_inputs_in_weights_layout(model: nn.Module) -> int:
    """Hook each `conv_in` of `model` (the UNet's; the VAE encoder's and decoder's). Returns how many
    hooks were added (0 when done before)."""
    convs = [m for name, m in model.named_modules() if name.split(".")[-1] == "conv_in"]
    # a 1x1 kernel is stored alike in both layouts: its weight could not tell which one the model is in
    assert convs and all(conv.kernel_size != (1, 1) for conv in convs), "expected 3x3 conv_in layers"
    added = 0
    for conv in convs:
        if _input_in_weights_layout not in conv._forward_pre_hooks.values():
            conv.register_forward_pre_hook(_input_in_weights_layout)
            added += 1
    return added


def in_the_layout_of_the_input(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A spatial transformer's map for `proj_out` (its `arrange_map`) in the layout of its input x: for a
    channels-last x no copy at all, the map's strides already being channels-last (see 3. above)."""
    return h.contiguous(memory_format=memory_format_of(x))


def keep_the_layout_in_spatial_transformers(model: nn.Module) -> int:
    """Set every `SpatialTransformer`'s `arrange_map` seam in `model` to `in_the_layout_of_the_input`;
    the module, its forward and its keys stay what they were. Returns how many changed (0 when done before)."""
    plain = [m for m in model.modules()
             if isinstance(m, SpatialTransformer) and m.arrange_map is not in_the_layout_of_the_input]
    for module in plain:
        module.arrange_map = in_the_layout_of_the_input
    return len(plain)
