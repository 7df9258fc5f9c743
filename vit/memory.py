"""The memory a ViT needs for a batch, estimated from its config, for checks before any work
(common/memory.py's `check_memory`): train_emotion.py's batches and synthetic faces, predict_emotion.py's
--batch_size.

Measured on a CPU in fp32 (one thread; the small preset at 48 and 192 pixels, B/16 at 224): a forward pass
without gradients peaks at about 20 floats per token and hidden unit of one image, whatever the depth; a
training step keeps about 20 per token, hidden unit and layer for backward. Rounded up to 24: the estimate
is an upper bound.
"""
from __future__ import annotations

from vit.model import ViTConfig

FLOATS_PER_TOKEN_WIDTH = 24           # a forward pass without gradients, per image
FLOATS_PER_TOKEN_WIDTH_LAYER = 24     # a training step, per image and layer
TRAINED_PARAMETER_BYTES = 16          # fp32 weight, its gradient, Adam's two moments


def parameter_count(config: ViTConfig) -> int:
    """Weights of a ViT classifier of `config`, counted on a model built on the meta device (no memory)."""
    from common.state_dict import empty_model
    from vit.model import ViTForImageClassification
    with empty_model():
        model = ViTForImageClassification(config)
    return sum(p.numel() for p in model.parameters())


def batch_bytes(config: ViTConfig, images: int, *, training: bool) -> int:
    """About how many bytes the activations of `images` images take at the peak of a forward pass
    (training: kept for backward), plus the pixels themselves."""
    tokens = config.num_patches + 1
    floats = (FLOATS_PER_TOKEN_WIDTH_LAYER * config.num_layers if training else FLOATS_PER_TOKEN_WIDTH)
    pixels = config.num_channels * config.image_size ** 2
    return 4 * images * (tokens * config.hidden_size * floats + pixels)
