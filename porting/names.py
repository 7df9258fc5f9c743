"""Our module names -> the checkpoint's module names, from the tensor pairing the loaders make.

A module of ours and a module of the checkpoint's reference code are the same module when they hold
the same tensors: the checkpoint keys our module's tensors load from are exactly the keys under the
checkpoint's module. That pairs almost everything with no table at all (diffusers: every module;
LDM: `input_blocks.4.0` with `down_blocks.1.resnets.0`). When several nested modules of both sides
hold the same tensors (`ff.net.0` around `ff.net.0.proj`), they pair from the innermost out.

What tensors cannot tell is written below as data, one row per module of the reference code that
has no module of ours (a wrapper that adds a residual or an activation after its last weight):
(checkpoint module, our module, "input" or "output" of ours, transform of the activation).
LDM's containers are `nn.Sequential`s, whose output is that of the last module inside: for LDM
layouts any checkpoint module left over gets the output of the last of our modules it covers.
"""
from __future__ import annotations

import torch

from porting.components import TraceError

# transformers' ViT: wrappers with no module of ours ({p} is "vit." in a classifier file, "" in a ViTModel file)
TRANSFORMERS_VIT_EXTRAS = [
    ("{p}embeddings", "blocks.0", "input", None),                          # [CLS] + patches + positions
    ("{p}embeddings.patch_embeddings", "patch_embed", "output", "tokens"),  # the conv's map as (B, N, D)
    ("{p}encoder.layer.{i}.attention.attention", "blocks.{i}.attn.proj", "input", None),  # heads, merged
    ("{p}encoder.layer.{i}.attention.output", "blocks.{i}.attn.proj", "output", None),    # dense (+ dropout)
    ("{p}encoder.layer.{i}.intermediate", "blocks.{i}.mlp.fc2", "input", None),          # GELU(dense)
    ("{p}encoder.layer.{i}.output", "blocks.{i}", "output", None),          # dense + the residual stream
    ("{p}encoder", "norm", "input", None),
    ("vit", "norm", "output", None),                                        # only when {p} is "vit."
]
TIMM_VIT_EXTRAS = [
    ("patch_embed", "patch_embed", "output", "tokens"),  # timm's PatchEmbed flattens
    ("blocks", "norm", "input", None),                   # an nn.Sequential timm calls: the last block's output
]
# transformers' CLIP text model ({p}: what precedes `embeddings.` in the file: "text_model.", "", ...)
CLIP_EXTRAS = [
    ("{p}embeddings", "layers.0", "input", None),                          # token + position embeddings
    ("{p}encoder", "final_layer_norm", "input", None),
    ("{p-}", "final_layer_norm", "output", None),                           # CLIPTextTransformer, when {p} ends in text_model.
]
# transformers' CLIP image tower (CLIPModel or CLIPVisionModelWithProjection files)
CLIP_VISION_EXTRAS = [
    ("vision_model.embeddings", "vision_model.pre_layernorm", "input", None),   # class + patches + positions
    ("vision_model.encoder", "vision_model", "output", None),   # the last block's output: last_hidden_state
]
EXTRAS = {"transformers-vit": TRANSFORMERS_VIT_EXTRAS, "timm-vit": TIMM_VIT_EXTRAS,
          "transformers-clip": CLIP_EXTRAS, "ldm-clip": CLIP_EXTRAS, "transformers-clip-vision": CLIP_VISION_EXTRAS}
SEQUENTIAL_LAYOUTS = ("ldm-unet", "ldm-vae")
# LDM's nn.ModuleLists, which its code indexes but never calls (unlike its nn.Sequentials): no output.
LDM_MODULE_LISTS = ("input_blocks", "output_blocks", "down", "up", "block", "attn", "transformer_blocks")


def checkpoint_tensors(component, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors shaped as our parameters (their gradients) under the checkpoint's keys, in the file's shapes,
    by the loaders' pairing: a tensor of ours loaded from several keys (the ViT's qkv, vit/weights.py
    `fuse_qkv`) splits along its first dimension into them, in their order; tensors of ours loaded from one
    key's row blocks (SD 2.x's OpenCLIP in_proj) are joined into it; one the file holds in another shape of
    the same size (the LDM VAE's 1x1 convs, our Linears) takes the file's shape."""
    from clip.weights import fuse_in_proj
    out = {}
    for ours, x in tensors.items():
        keys = component.pairing.get(ours)
        if keys is None:
            raise TraceError(f"our tensor {ours} comes from no key of the checkpoint, so it has no name there")
        for key, part in zip(keys, x.chunk(len(keys), dim=0)):
            out[key] = part.reshape(component.shapes[key])
    return fuse_in_proj(out)     # OpenCLIP's q/k/v row blocks (`in_proj_weight#q`, ...) back into one tensor


def transform(kind: str | None, x: torch.Tensor) -> torch.Tensor:
    if kind == "tokens":            # (B, D, h, w) -> (B, h*w, D): a patch-embedding conv's map as tokens
        return x.flatten(2).transpose(1, 2)
    return x


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def checkpoint_names(component, modules: dict[str, list[str]], outputs: dict[str, torch.Tensor],
                     inputs: dict[str, torch.Tensor], order: dict[str, float]) -> list[tuple[str, str, str, torch.Tensor]]:
    """[(checkpoint module, our module, what, activation)] for every module we can name in the checkpoint's layout.

    modules: our traced module -> our tensor names under it; outputs/inputs: what the hooks saw;
    order: our module -> when its forward ended (inputs: began)."""
    pairing = component.pairing
    image = {m: frozenset(k for key in keys if key in pairing for k in pairing[key]) for m, keys in modules.items()}
    theirs: dict[str, set[str]] = {}
    for keys in pairing.values():
        for key in keys:
            for p in _prefixes(key):
                theirs.setdefault(p, set()).add(key)
    everything = frozenset(k for keys in pairing.values() for k in keys)
    # a list (every key continues with an index) is indexed, never called: it pairs with no module of
    # ours (diffusers' `resnets`, `to_out`, `ff.net`); LDM's Sequentials among them are handled below
    is_list = {p: all(k[len(p) + 1:].split(".")[0].isdigit() for k in keys) for p, keys in theirs.items()}
    by_image: dict[frozenset, list[str]] = {}
    for p, keys in theirs.items():
        if not is_list[p]:
            by_image.setdefault(frozenset(keys), []).append(p)

    rows, named = [], set()
    # fused modules (our qkv): one output, split into the checkpoint's separate modules
    for ours, n in component.fused.items():
        if ours in outputs:
            for key, part in zip(pairing[ours + ".weight"], outputs[ours].chunk(n, dim=-1)):
                rows.append((key.rsplit(".", 1)[0], ours, "output", part))
                named.add(key.rsplit(".", 1)[0])
    # same tensors, same module: pair innermost first
    groups: dict[frozenset, list[str]] = {}
    for m in outputs:
        if m not in component.fused and image.get(m) and image[m] in by_image:
            groups.setdefault(image[m], []).append(m)
    depth = lambda name: name.count(".")
    for img, ours in groups.items():
        ours = sorted(ours, key=lambda m: (-depth(m), order[m]))
        candidates = sorted((p for p in by_image[img] if p not in named), key=depth, reverse=True)
        for m, p in zip(ours, candidates):
            rows.append((p, m, "output", outputs[m]))
            named.add(p)
    # rows of data for the reference's wrappers
    blocks = sorted({int(m.split(".")[1]) for m in outputs if m.startswith(("blocks.", "layers.")) and m.count(".") == 1})
    p = component.ckpt_prefix
    if component.layout == "transformers-vit":
        p = "vit." if any(k.startswith("vit.") for k in component.shapes) else ""
    for ckpt, ours, what, kind in EXTRAS.get(component.layout, []):
        if ckpt == "vit" and p != "vit.":
            continue
        if ckpt == "{p-}":
            if not p.endswith("text_model."):
                continue
            ckpt = p[:-1]
        for i in (blocks if "{i}" in ckpt else [None]):
            c, o = ckpt.format(p=p, i=i), ours.format(i=i)
            seen = inputs if what == "input" else outputs
            if o in seen and c not in named:
                rows.append((c, o, what, transform(kind, seen[o])))
                named.add(c)
    # LDM's nn.Sequential containers (input_blocks.4, in_layers, time_embed, out, to_out, ff.net): the
    # output of the last module of ours inside
    if component.layout in SEQUENTIAL_LAYOUTS:
        for p_, keys in theirs.items():
            if p_ in named or not is_list[p_] or p_.rsplit(".", 1)[-1] in LDM_MODULE_LISTS or keys >= everything:
                continue
            inside = [m for m in outputs if image.get(m) and image[m] <= keys]
            if inside and frozenset().union(*(image[m] for m in inside)) == frozenset(keys):
                last = max(inside, key=lambda m: order[m])
                rows.append((p_, last, "output", outputs[last]))
                named.add(p_)
    return rows
