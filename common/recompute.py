"""Gradient checkpointing, called "recompute" here so that "checkpoint" only ever means saved
training state: a block's activations are not kept for the backward pass but recomputed from its
input when the backward pass needs them (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"). Each model that offers it has one switch, `model.gradient_checkpointing` (the name
diffusers and transformers use), and calls `maybe_recompute` on its blocks."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_recompute(module: nn.Module, on: bool, *args) -> torch.Tensor:
    """module(*args), recomputed in the backward pass when `on` and gradients are being recorded."""
    if on and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
