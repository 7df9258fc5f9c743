"""One component of a checkpoint, loaded by our loaders, with its tensors paired with ours.

A `Component` holds the built model, how to run it on named inputs, and `pairing`: for each of our
tensor names, the checkpoint key(s) it was loaded from. The pairing is made by running the loaders' own
key tables (vit/weights.py, clip/weights.py, diffusion/checkpoints/single_file.py) over the checkpoint's
key names, exactly as a load does, so a trace names modules the way the file does, whatever variant of
a layout it is (transformers 4 or 5 prefixes, old diffusers VAE attention names, an SD v1 single file,
SD 2.x's OpenCLIP tower, whose fused in_proj pairs with our q, k, v as its row blocks `in_proj_weight#q`...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from common.hub_cache import resolve_model
from common.state_dict import CheckpointError, find_weights, read_safetensors, rename

COMPONENTS = ("vit", "text_encoder", "text_encoder_2", "clip_vision", "unet", "vae_encoder", "vae_decoder")


class TraceError(ValueError):
    """Bad input to the porting tools; the message names it."""


@dataclass
class Input:
    kind: str                      # "float", "int" or "number"
    shape: tuple                   # one entry per dimension: an int (required size), None (any) or "B"
    multiple: dict = field(default_factory=dict)   # dim -> the size must be a multiple of this
    maximum: dict = field(default_factory=dict)    # dim -> the size must be at most this
    optional_dims: bool = False    # a 0-dim tensor is accepted too (a timestep for the whole batch)


@dataclass
class Component:
    name: str                          # one of COMPONENTS
    layout: str                        # mapping layout: "transformers-vit", "ldm-unet", ...
    model: torch.nn.Module             # the module whose submodules are traced
    run: Callable[[dict], object]      # forward on validated inputs
    inputs: dict[str, Input]
    scope: tuple[str, ...]             # our module prefixes that belong to the component ("" = all)
    strip: tuple[str, ...]             # prefixes removed from names, ours and the checkpoint's, in order
    pairing: dict[str, tuple[str, ...]]  # our tensor name -> the checkpoint key(s) it comes from
    shapes: dict[str, tuple[int, ...]]   # checkpoint key -> its shape in the file
    fused: dict[str, int] = field(default_factory=dict)  # our module -> its output splits into n checkpoint modules
    ckpt_prefix: str = ""              # text encoder: what precedes `embeddings.` in the file's keys


def _keys_and_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix != ".safetensors":   # a folder's sharded or pickled weights, as the loaders read them
        from diffusion.checkpoints.ckpt import read_weights
        return {k: tuple(v.shape) for k, v in read_weights(path).items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _pair(mapping: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """{our key: checkpoint key} (from `rename` over {k: k}) -> {our key: (checkpoint key,)}."""
    return {ours: (theirs,) for ours, theirs in mapping.items()}


def _is_sd_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------- ViT
def load_vit_component(path: Path) -> Component:
    from vit.weights import KEYS, _QKV, load_vit

    try:
        loaded = load_vit(path)
    except CheckpointError as e:
        if "no classification head" not in str(e):
            raise
        loaded = load_vit(path, labels=["LABEL_0"])  # a backbone: its (new) head is not in the file, nor traced
    shapes = _keys_and_shapes(Path(loaded.source))
    config = loaded.model.config
    unfused = rename({k: k for k in shapes}, KEYS[loaded.layout])   # our name (q, k, v still apart) -> file key
    pairing, groups = {}, {}
    for ours, theirs in unfused.items():
        m = _QKV.fullmatch(ours)
        if m:
            groups.setdefault(f"{m[1]}.qkv.{m[3]}", {})[m[2]] = theirs
        else:
            pairing[ours] = (theirs,)
    pairing.update({k: (g["q"], g["k"], g["v"]) for k, g in groups.items()})
    layout = "timm-vit" if loaded.layout == "timm" else "transformers-vit"
    fused = {f"blocks.{i}.attn.qkv": 3 for i in range(config.num_layers)} if layout == "transformers-vit" else {}
    model = loaded.model
    if loaded.new_head:   # a backbone (transformers' ViTModel): its output is the final LayerNorm's tokens
        run = lambda x: model.forward_features(x["pixel_values"])
        scope = tuple(n for n, _ in [*model.named_children(), *model.named_parameters(recurse=False)] if n != "head")
    else:
        run, scope = lambda x: model(x["pixel_values"]), ("",)
    return Component(
        name="vit", layout=layout, model=model, run=run,
        inputs={"pixel_values": Input("float", ("B", config.num_channels, None, None),
                                      multiple={2: config.patch_size, 3: config.patch_size})},
        scope=scope, strip=(), pairing=pairing, shapes=shapes, fused=fused)


# ------------------------------------------------------------------------------------- text encoder
def load_text_component(path: Path, config_dir: Path | None = None, name: str = "text_encoder") -> Component:
    """The text encoder, or SDXL's second (`name` "text_encoder_2": CLIPTextModelWithProjection, its output the
    projected pooled embedding too), from a folder or a single file (SDXL's: the embedder's own tensors)."""
    from clip.text_model import CLIPTextConfig
    from clip.weights import (IN_PROJ, OPENCLIP_PREFIX, SD_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX,
                              load_text_encoder, split_in_proj, text_encoder_state_dict, text_prefix, transpose_projection)
    from diffusion.checkpoints.load import load_text_encoder_single_file

    projection = name == "text_encoder_2"
    if _is_sd_folder(path):
        path = path / name
    config = None
    if config_dir is not None:
        config = CLIPTextConfig.from_json(_config_file(config_dir, name))
    weights = find_weights(path, "transformers") if path.is_dir() else path
    shapes = _keys_and_shapes(weights)
    sdxl_prefix = SDXL_OPENCLIP_PREFIX if projection else SDXL_CLIP_PREFIX
    if any(k.startswith(sdxl_prefix) for k in shapes):    # an SDXL single file: this embedder's tensors
        shapes = {k: v for k, v in shapes.items() if k.startswith(sdxl_prefix)}
        tensors = read_safetensors(weights, keys=lambda k: k.startswith(sdxl_prefix))
        model = load_text_encoder_single_file(tensors, config, source=str(weights), with_projection=projection).eval()
    elif projection and not path.is_dir():
        raise CheckpointError(f"{weights}: no SDXL second text encoder ({SDXL_OPENCLIP_PREFIX}*) in this file")
    else:
        model = load_text_encoder(path, config=config, with_projection=projection)
    if any(k.startswith(SD_PREFIX) for k in shapes):
        shapes = {k: v for k, v in shapes.items() if k.startswith(SD_PREFIX)}
    prefix = text_prefix(shapes)
    if prefix in (OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX):   # our q/k/v pair with row blocks of the fused in_proj
        layout = "openclip-text" if prefix == OPENCLIP_PREFIX else "sdxl-openclip-text"
        shapes = {**shapes, **{k: v.shape for k, v in split_in_proj(
            {k: torch.empty(s, device="meta") for k, s in shapes.items() if IN_PROJ.fullmatch(k)}).items()}}
        if prefix == SDXL_OPENCLIP_PREFIX:   # SDXL reads the projection, transposed
            shapes |= {k: v.shape for k, v in transpose_projection(
                {k: torch.empty(s, device="meta") for k, s in shapes.items() if k.endswith(".text_projection")}).items()}
    elif prefix == SDXL_CLIP_PREFIX:
        layout = "sdxl-ldm-clip"
    else:
        layout = ("ldm-clip" if prefix.startswith(SD_PREFIX) else
                  "sdxl-transformers-clip-projection" if projection else "transformers-clip")
    names = split_in_proj(dict.fromkeys(shapes))
    names = {k: k for k in (transpose_projection(names) if prefix == SDXL_OPENCLIP_PREFIX else names)}
    pairing = _pair(text_encoder_state_dict(names, source=str(weights), num_layers=model.config.num_hidden_layers,
                                            with_projection=projection))
    c = model.config
    run = (lambda x: model(x["input_ids"]).text_embeds) if projection else (lambda x: model(x["input_ids"]))
    return Component(
        name=name, layout=layout, model=model, run=run,
        inputs={"input_ids": Input("int", ("B", None), maximum={1: c.max_position_embeddings})},
        scope=("",), strip=(), pairing=pairing, shapes=shapes, ckpt_prefix=prefix)


# ------------------------------------------------------------------------------ CLIP's image tower
def load_clip_vision_component(path: Path) -> Component:
    """CLIP's image tower and its projection (what get_image_features runs), from a CLIPModel or a
    CLIPVisionModelWithProjection file; names as the file's (`vision_model.encoder.layers.3.mlp.fc1`)."""
    from clip.model_weights import CLIP_KEYS, VISION, load_clip

    loaded = load_clip(path)
    model = loaded.model
    if model.vision_model is None:
        raise CheckpointError(f"{loaded.source}: a CLIP text tower only (CLIPTextModelWithProjection)")
    shapes = {k: v for k, v in _keys_and_shapes(Path(loaded.source)).items()
              if k.startswith(VISION) or k == "visual_projection.weight"}
    c = model.config.vision
    return Component(
        name="clip_vision", layout="transformers-clip-vision", model=model,
        run=lambda x: model.get_image_features(x["pixel_values"]),
        inputs={"pixel_values": Input("float", ("B", c.num_channels, c.image_size, c.image_size))},
        scope=("vision_model", "visual_projection"), strip=(), pairing=_pair(rename({k: k for k in shapes}, CLIP_KEYS)),
        shapes=shapes)


# ------------------------------------------------------------------------------------ UNet and VAE
def _config_file(config_dir: Path, part: str) -> Path:
    """`--config DIR`: DIR/<part>/config.json (a diffusers folder's layout) or DIR/config.json."""
    for candidate in (config_dir / part / "config.json", config_dir / "config.json"):
        if candidate.is_file():
            return candidate
    raise TraceError(f"--config {config_dir}: no {part}/config.json (nor config.json) in it")


def _load_unet_or_vae(path: Path, part: str, config_dir: Path | None):
    """The UNet or the VAE (`part`) of a diffusers folder or an SD v1 single file, by our loaders:
    (model, the file's key -> shape, pairing, mapping layout)."""
    from diffusion.checkpoints import load, single_file
    from diffusion.models.unet import UNetConfig
    from diffusion.models.vae import VAEConfig

    if path.is_dir():
        if not (path / part).is_dir():
            raise TraceError(f"--model {path}: no {part}/ folder (not a diffusers Stable Diffusion folder)")
        model = load.load_unet_folder(path) if part == "unet" else load.load_vae_folder(path)
        shapes = _keys_and_shapes(load.weights_file(path, part))
        names = {k: k for k in shapes}   # our modules carry diffusers' names; an old VAE folder, older ones
        pairing = names if part == "unet" else rename(names, single_file.DEPRECATED_VAE_ATTENTION_KEYS)
        return model, shapes, _pair(pairing), f"diffusers-{part}"
    unet_t, vae_t, _ = single_file.split_single_file(load.read_single_file(path), use_ema=False, source=str(path))
    tensors, config_class, infer_config, table, load_single_file = {
        "unet": (unet_t, UNetConfig, single_file.infer_unet_config, single_file.unet_table, load.load_unet_single_file),
        "vae": (vae_t, VAEConfig, single_file.infer_vae_config, single_file.vae_table, load.load_vae_single_file),
    }[part]
    config = (config_class.from_json(_config_file(config_dir, part)) if config_dir is not None
              else infer_config(tensors, source=str(path)))
    model = load_single_file(tensors, config, source=str(path))
    pairing = rename({k: k for k in tensors}, table(config))
    return model, {k: tuple(v.shape) for k, v in tensors.items()}, _pair(pairing), f"ldm-{part}"


def load_unet_component(path: Path, config_dir: Path | None = None) -> Component:
    """The UNet; SDXL's also takes its micro-conditioning inputs, text_embeds (B, P) and time_ids (B, 6)."""
    model, shapes, pairing, layout = _load_unet_or_vae(path, "unet", config_dir)
    c = model.config
    factor = 2 ** (len(c.block_out_channels) - 1)
    added = {} if c.pooled_text_dim is None else {"text_embeds": Input("float", ("B", c.pooled_text_dim)),
                                                   "time_ids": Input("float", ("B", 6))}
    if added and layout.endswith("-unet"):
        layout = "sdxl-" + layout
    return Component(
        name="unet", layout=layout, model=model,
        run=lambda x: model(x["sample"], x["timestep"], x["encoder_hidden_states"], **{k: x[k] for k in added}),
        inputs={"sample": Input("float", ("B", c.in_channels, None, None), multiple={2: factor, 3: factor}),
                "timestep": Input("number", ("B",), optional_dims=True),
                "encoder_hidden_states": Input("float", ("B", None, c.cross_attention_dim)), **added},
        scope=("",), strip=(), pairing=pairing, shapes=shapes)


def load_vae_component(path: Path, name: str, config_dir: Path | None = None) -> Component:
    """vae_encoder: pixels -> encoder -> quant_conv (the moments); vae_decoder: latents (unscaled,
    what `vae.decode` takes) -> post_quant_conv -> decoder. Names are relative to `encoder.` /
    `decoder.`; the 1x1 quant_conv / post_quant_conv keep their VAE-level names."""
    from diffusion.checkpoints.single_file import VAE_PREFIX

    model, shapes, pairing, layout = _load_unet_or_vae(path, "vae", config_dir)
    top = (VAE_PREFIX,) if layout == "ldm-vae" else ()
    c = model.config
    f = c.spatial_factor
    if name == "vae_encoder":
        return Component(
            name=name, layout=layout, model=model, run=lambda x: model.quant_conv(model.encoder(x["pixel_values"])),
            inputs={"pixel_values": Input("float", ("B", c.in_channels, None, None), multiple={2: f, 3: f})},
            scope=("encoder", "quant_conv"), strip=(*top, "encoder."), pairing=pairing, shapes=shapes)
    return Component(
        name=name, layout=layout, model=model, run=lambda x: model.decode(x["latents"]),
        inputs={"latents": Input("float", ("B", c.latent_channels, None, None))},
        scope=("decoder", "post_quant_conv"), strip=(*top, "decoder."), pairing=pairing, shapes=shapes)


def load_component(path: str | Path, name: str, *, config_dir: str | Path | None = None) -> Component:
    """config_dir: configs for a single file whose shapes cannot tell everything (a diffusers folder
    or a folder holding config.json), as `load_stable_diffusion(config_dir=...)` takes them."""
    path = resolve_model(path, flag="--model")          # a local path, or a repo id of the Hugging Face cache
    config_dir = resolve_model(config_dir, flag="--config") if config_dir is not None else None
    if config_dir is not None and path.is_dir():
        raise TraceError(f"--config {config_dir}: only for single files; {path} is a folder with its own configs")
    if name not in COMPONENTS:
        raise TraceError(f"--component {name!r}: unknown; choose one of {', '.join(COMPONENTS)}")
    try:
        if name == "vit":
            return load_vit_component(path)
        if name in ("text_encoder", "text_encoder_2"):
            return load_text_component(path, config_dir, name)
        if name == "clip_vision":
            return load_clip_vision_component(path)
        if name == "unet":
            return load_unet_component(path, config_dir)
        return load_vae_component(path, name, config_dir)
    except (CheckpointError, FileNotFoundError) as e:
        raise TraceError(f"--model {path} has no {name} component we can load: {e}") from None


# ------------------------------------------------------------------------------------------ inputs
def check_inputs(component: Component, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs, checked against the component's names, dtypes and shapes; TraceError names the first problem."""
    expected = component.inputs
    def shape_text(spec: Input) -> str:
        dims = [str(d) if d is not None else "any" for d in spec.shape]
        dims = [d + f" (multiple of {spec.multiple[i]})" if i in spec.multiple else d for i, d in enumerate(dims)]
        dims = [d + f" (at most {spec.maximum[i]})" if i in spec.maximum else d for i, d in enumerate(dims)]
        return f"{spec.kind} ({', '.join(dims)})"
    wanted = "; ".join(f"{n}: {shape_text(s)}" for n, s in expected.items())
    missing, extra = sorted(set(expected) - set(inputs)), sorted(set(inputs) - set(expected))
    if missing or extra:
        raise TraceError(f"inputs for {component.name}: " + ", ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else []))
            + f"; expected {wanted}")
    batch = None
    for n, spec in expected.items():
        t = inputs[n]
        ok_kind = {"float": t.is_floating_point(), "int": t.dtype in (torch.int64, torch.int32),
                   "number": t.dtype != torch.bool and not t.is_complex()}[spec.kind]
        if not ok_kind:
            raise TraceError(f"input {n}: dtype {t.dtype}; expected {shape_text(spec)}")
        if spec.optional_dims and t.ndim == 0:
            continue
        bad = t.ndim != len(spec.shape)
        for i, d in enumerate(spec.shape if not bad else ()):
            size = t.shape[i]
            if d == "B":
                batch = size if batch is None else batch
                bad |= size != batch
            elif d is not None:
                bad |= size != d
            bad |= i in spec.multiple and size % spec.multiple[i] != 0
            bad |= i in spec.maximum and size > spec.maximum[i]
        if bad:
            raise TraceError(f"input {n}: shape {tuple(t.shape)}; expected {shape_text(spec)}"
                             + (f" with batch {batch}" if batch is not None else ""))
    return inputs
