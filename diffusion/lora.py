"""LoRA: a low-rank update learned beside a frozen weight (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models").

    h = W x + (alpha / r) * B A x          the paper's eq. 3 (its scale is alpha / r, sec. 4.1)

A (r, in) projects down to the rank r, B (out, r) back up; B starts at zero so training starts from the
base model. Around a Conv2d (kohya's "LoCon" keys on ResNet convs and 1x1 projections) A is a conv with
the base's kernel, stride and padding and B a 1x1 conv: the same product, per pixel.

    inject(unet, UNET_TARGETS, rank=4, alpha=4)     wrap every to_q/to_k/to_v/to_out.0 in a LoRALayer
    lora_state_dict(unet)                            {"down_blocks.0...to_q.lora_A.weight": ..., ...}
    fuse(unet, scale=0.8)                            W += 0.8 * (alpha / r) * B A, and unwrap
    remove(unet)                                     unwrap, dropping the update

Module names are peft's (`base_layer`, `lora_A`, `lora_B`), so a wrapped model's LoRA keys are diffusers'
own PEFT-format keys. Applying LoRA *files* (diffusers and kohya key formats) is
diffusion/checkpoints/lora_files.py.
"""
from __future__ import annotations

import torch
from torch import nn

# Which modules diffusers' train_dreambooth_lora.py adapts: the four projections of every attention.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")                # diffusion/models/attention.py
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")   # clip/text_model.py


class LoRALayer(nn.Module):
    """`base_layer(x) + scale * (alpha / r) * lora_B(lora_A(x))` around a Linear or a Conv2d."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, *, rank: int, alpha: float, scale: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank {rank}: must be at least 1")
        self.base_layer = base_layer              # a Linear/Conv2d, or another LoRALayer (stacked LoRAs add)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(scale)
        b = innermost(base_layer)
        kw = dict(device=b.weight.device, dtype=torch.float32)   # the update is kept in fp32, whatever the base
        if isinstance(b, nn.Linear):
            self.lora_A = nn.Linear(b.in_features, rank, bias=False, **kw)                      # (r, in)
            self.lora_B = nn.Linear(rank, b.out_features, bias=False, **kw)                     # (out, r)
        elif isinstance(b, nn.Conv2d) and b.groups == 1:
            self.lora_A = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, b.dilation,
                                    bias=False, **kw)                                           # (r, in, k, k)
            self.lora_B = nn.Conv2d(rank, b.out_channels, 1, bias=False, **kw)                  # (out, r, 1, 1)
        else:
            raise TypeError(f"LoRA wraps a Linear or an ungrouped Conv2d, not {type(b).__name__}")
        # diffusers' training init (peft's init_lora_weights="gaussian"): A ~ N(0, 1/r^2), B = 0.
        nn.init.normal_(self.lora_A.weight, std=1 / rank)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x, times the user's scale (a "LoRA weight")
        # the update runs in its own fp32 and is added in the base's dtype (as peft does)
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return self.base_layer(x) + ((self.scale * self.alpha / self.rank) * update).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * (alpha / r) * B A, shaped as the base weight: (out, in) or (out, in, k, k)."""
        A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
        if A.ndim == 2:
            delta = B @ A                                                   # (out, r) @ (r, in)
        else:
            delta = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)         # per kernel tap
        return (self.scale * self.alpha / self.rank) * delta


def innermost(layer: nn.Module) -> nn.Module:
    """The Linear or Conv2d under any number of stacked LoRALayers."""
    while isinstance(layer, LoRALayer):
        layer = layer.base_layer
    return layer


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the model's Linear layers whose name ends in one of `targets` ("to_q", "to_out.0")."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def check_rank(model: nn.Module, targets: tuple[str, ...], rank: int, *, flag: str = "rank") -> None:
    """Refuse training a rank above the narrowest adapted layer's width, min(in, out): B A has rank at most
    that, so a higher rank adds parameters, memory and time (rank 100000 on 32-wide layers: a 3.4 GB file)
    and nothing it could learn. A ValueError naming the layer; works on a model on the meta device."""
    widths = {n: min(m.in_features, m.out_features) for n, m in model.named_modules()
              if n in set(target_names(model, targets))}
    if not widths:
        return
    name = min(widths, key=widths.get)
    if rank > widths[name]:
        raise ValueError(f"{flag} {rank}: above the width of the narrowest layer it adapts, {name} "
                         f"({widths[name]}): an update B A of that layer has rank {widths[name]} at most; "
                         f"choose {widths[name]} or less")


def inject(model: nn.Module, names, *, rank: int, alpha: float, scale: float = 1.0) -> list[LoRALayer]:
    """Wrap each named module in a LoRALayer (a module already wrapped gets a second update around
    the first: stacked LoRAs add). `names` is a list of module names, or a tuple of targets
    (UNET_TARGETS) to find by `target_names`. Returns the new layers."""
    if isinstance(names, tuple):
        names = target_names(model, names)
    if not names:
        raise ValueError("no module to adapt: the target list matched nothing in the model")
    layers = []
    for name in names:
        parent, child = _parent(model, name)
        layer = LoRALayer(getattr(parent, child), rank=rank, alpha=alpha, scale=scale)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The outermost LoRALayer of each adapted module, by the module's own name (no `base_layer.`)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer) and not any(name.startswith(n + ".") for n in found):
            found[name] = m
    return found


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable update only: "<module>.lora_A.weight" and "<module>.lora_B.weight" per adapted module."""
    return {f"{name}.{ab}.weight": getattr(layer, ab).weight for name, layer in lora_layers(model).items()
            for ab in ("lora_A", "lora_B")}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy `lora_state_dict`'s tensors back, strictly (a missing or unexpected key is an error)."""
    from common.state_dict import check_keys
    own = lora_state_dict(model)
    check_keys({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()},
               source=source)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def _unwrap(model: nn.Module, fuse_update: bool) -> int:
    n = 0
    for name in list(lora_layers(model)):
        parent, child = _parent(model, name)
        layer = getattr(parent, child)
        inner = layer
        while isinstance(inner, LoRALayer):     # stacked LoRAs: every level's update, onto the one base
            if fuse_update:
                base = innermost(inner)
                with torch.no_grad():
                    base.weight.add_(inner.delta_weight().to(base.weight.dtype))
            inner, n = inner.base_layer, n + 1
        setattr(parent, child, inner)
    return n


def fuse(model: nn.Module) -> int:
    """W += scale * (alpha / r) * B A into every adapted module's base weight, then unwrap it: the model
    is a plain model again, as fast as before. Returns how many updates were fused."""
    return _unwrap(model, fuse_update=True)


def remove(model: nn.Module) -> int:
    """Unwrap every adapted module, dropping its update. Returns how many updates were removed."""
    return _unwrap(model, fuse_update=False)
