"""Memory layout of the feature maps: channels-first (NCHW, PyTorch's default) or channels-last (NHWC).

A (B, C, H, W) tensor means the same numbers in either layout; only the order in memory differs. In
channels-last, the C values of one pixel sit side by side: the order in which oneDNN's bf16
convolutions ran fastest here (the table below), and the order the spatial transformer's tokens
already have (one token per pixel: no copy in or out).

The models follow whatever layout their weights are stored in (`module.to(memory_format=...)`): each
model's first conv takes its input in the weights' layout (`in_layout_of`), oneDNN answers a
channels-last weight with a channels-last output, GroupNorm, SiLU, adds, concatenation and nearest
upsampling keep their input's layout, and the few places that reshape a map by hand
(`SpatialTransformer`, `upsample2x_conv3x3`) hand it back in their input's layout. A mix of the two
layouts inside one model is slower than either (see attention.py); tests/test_sd_models.py hooks
every convolution and GroupNorm to check that none happens.
"""
from __future__ import annotations

import torch

LAYOUTS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last}  # name -> format


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last if the (B, C, H, W) tensor x is stored channels-last, else contiguous_format.
    (A map with C == 1 or H == W == 1 is both; it counts as channels-first.)"""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# Where channels-last pays, measured on a 2-core AMX CPU with full-size SD v1 (the same model in both
# layouts, time channels-first / channels-last, median of back-to-back pairs or alternating processes):
#   UNet CFG step at 512x512         bf16 1.29x   fp32 0.97x (no gain: it stays channels-first)
#   UNet training step (train_sd)    bf16 1.35x
#   VAE decode at 512x512            bf16 1.50x   fp32 1.15x
# fp16 on a CPU, and every GPU, are unmeasured here: they stay channels-first.
CPU_CHANNELS_LAST = {"unet": ("bf16",), "vae": ("fp32", "bf16")}


def fastest_memory_format(model: str, *, device: torch.device, precision: str) -> torch.memory_format:
    """The layout, by the table above, in which `model` ("unet" or "vae") runs fastest."""
    fast = device.type == "cpu" and precision in CPU_CHANNELS_LAST[model]
    return torch.channels_last if fast else torch.contiguous_format


def arrange_for_speed(models, *, device: torch.device, precision: str) -> dict[str, str]:
    """Store `models.unet` and `models.vae` (in place) in the layout that runs fastest for `device`
    and `precision` ("fp32", "bf16", "fp16"). Returns {"unet": layout, "vae": layout}.

    The numbers are the same up to rounding in either layout (fp32: max |diff| about 1e-5, the
    convolutions sum in another order); tests/test_sd_models.py checks channels-last against diffusers.
    """
    chosen = {}
    for name in ("unet", "vae"):
        memory_format = fastest_memory_format(name, device=device, precision=precision)
        getattr(models, name).to(memory_format=memory_format)
        chosen[name] = next(layout for layout, fmt in LAYOUTS.items() if fmt == memory_format)
    return chosen


def in_layout_of(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """x stored in the layout of `conv`'s weight (no copy when it already is). A model's first conv
    calls this on the model's input: oneDNN answers a channels-last input with a channels-last output
    even when the weights are channels-first, so an input in the other layout (the channel slice that a
    channels-last VAE's posterior mean is, say) would otherwise carry its layout into the whole model."""
    return x.contiguous(memory_format=memory_format_of(conv.weight))
