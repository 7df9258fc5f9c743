"""Loading CLIP models with their projections (clip/model.py) by key mapping, strictly.

Three transformers files hold a CLIP model with a projection, all under the same names:

    CLIPModel                        vision_model.* + visual_projection.weight + text_model.* +
                                     text_projection.weight + logit_scale   (openai/clip-vit-large-patch14)
    CLIPVisionModelWithProjection    vision_model.* + visual_projection.weight
    CLIPTextModelWithProjection      text_model.* + text_projection.weight

CLIP_KEYS is the whole mapping: the image tower's rows (VISION_KEYS) below `vision_model.`, the text
tower's (clip/weights.py TEXT_KEYS, the same table the SD text encoder loads by) below `text_model.`, and
the three tensors of the joint space. `position_ids` (a saved copy of 0..N that older transformers kept
in the file) is dropped: positions are computed. Files without a projection (CLIPVisionModel,
CLIPTextModel, SD's text_encoder/) are refused by name: without W_i / W_t there is no joint space.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from clip.model import CLIPConfig, CLIPModel
from clip.preprocess import clip_preprocess_config
from clip.text_model import CLIPTextConfig
from clip.vision_model import CLIPVisionConfig
from clip.weights import SD_PREFIX, TEXT_KEYS, config_from_state_dict
from common.files import read_json
from common.state_dict import (CheckpointError, KeyTable, check_finite, empty_model, find_weights, listing,
                               load_strict, read_safetensors, rename)
from diffusion.checkpoints.ckpt import read_weights
from vit.preprocess import ResizeCropConfig

HEAD_WIDTH = 64   # every OpenAI CLIP image tower has 64-wide heads (ViT-B/32: 768 = 12 x 64; L/14: 1024 = 16 x 64)

# (our name, transformers' CLIPVisionModel name below `vision_model.`)
VISION_KEYS = [
    ("class_embedding", "embeddings.class_embedding"),                  # (D,): the [CLS] token's embedding
    ("patch_embedding.weight", "embeddings.patch_embedding.weight"),    # (D, 3, P, P), no bias
    ("position_embedding.weight", "embeddings.position_embedding.weight"),
    ("pre_layernorm.{w}", "pre_layrnorm.{w}"),                          # sic: transformers' spelling, in every file
    *[(ours, theirs) for ours, theirs in TEXT_KEYS if ours.startswith("layers.")],   # the text tower's block names
    ("post_layernorm.{w}", "post_layernorm.{w}"),
]
VISION, TEXT = "vision_model.", "text_model."
CLIP_KEYS = KeyTable(
    [(VISION + ours, VISION + theirs) for ours, theirs in VISION_KEYS]
    + [(TEXT + ours, TEXT + theirs) for ours, theirs in TEXT_KEYS]
    + [("visual_projection.weight", "visual_projection.weight"),      # W_i (P, D_image)
       ("text_projection.weight", "text_projection.weight"),          # W_t (P, D_text)
       ("logit_scale", "logit_scale")],                               # t, a scalar
    drop=[VISION + "embeddings.position_ids", TEXT + "embeddings.position_ids"])


@dataclass
class LoadedCLIP:
    model: CLIPModel
    preprocess: ResizeCropConfig | None   # None without an image tower
    folder: Path | None                   # the model folder (its tokenizer files, if any), None for a bare file
    source: str                           # the weights file


def _what_it_is(keys: list[str]) -> str:
    """A name for a file that is not a CLIP model with a projection, for the error message."""
    if any(k.startswith(SD_PREFIX) for k in keys):
        return "a Stable Diffusion single file (its CLIP text encoder has no projection)"
    if any(k.endswith("embeddings.class_embedding") for k in keys):
        return "a CLIP image tower without visual_projection (CLIPVisionModel)"
    if any(k.endswith("embeddings.token_embedding.weight") for k in keys):
        return "a CLIP text tower without text_projection (CLIPTextModel, as SD's text_encoder/)"
    return f"not a CLIP model (first keys: {listing(sorted(keys), 5)})"


def check_clip_keys(keys: list[str], *, source: str) -> tuple[bool, bool]:
    """(has the image tower, has the text tower), each with its projection; CheckpointError otherwise."""
    vision = any(k.startswith(VISION) for k in keys) and "visual_projection.weight" in keys
    text = any(k.startswith(TEXT) for k in keys) and "text_projection.weight" in keys
    if not (vision or text):
        raise CheckpointError(f"{source}: {_what_it_is(keys)}; a CLIP model needs a tower with its projection "
                              "(CLIPModel, CLIPVisionModelWithProjection or CLIPTextModelWithProjection)")
    return vision, text


def infer_vision_config(sd: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """The image tower's architecture from tensor shapes (our names, below vision_model.); heads 64 wide."""
    D, C, P, _ = sd[VISION + "patch_embedding.weight"].shape
    grid = round((sd[VISION + "position_embedding.weight"].shape[0] - 1) ** 0.5)
    if D % HEAD_WIDTH:
        raise CheckpointError(f"cannot infer the image tower's heads: width {D} is not a multiple of {HEAD_WIDTH}; "
                              "give the model folder (its config.json)")
    layers = 1 + max(int(m[1]) for k in sd if (m := re.match(rf"{VISION}layers\.(\d+)\.", k)))
    return CLIPVisionConfig(hidden_size=D, intermediate_size=sd[VISION + "layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=D // HEAD_WIDTH, image_size=grid * P,
                            patch_size=P, num_channels=C)


def read_config(folder: Path | None, sd: dict[str, torch.Tensor], vision: bool, text: bool) -> CLIPConfig:
    """From the folder's config.json (CLIPConfig, CLIPVisionConfig or CLIPTextConfig with projection_dim),
    else from the shapes."""
    path = folder / "config.json" if folder is not None else None
    if path is not None and path.is_file():
        d = read_json(path)
        try:
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, not {type(d).__name__}")
            return CLIPConfig(vision=CLIPVisionConfig.from_dict(d) if vision else None,
                              text=CLIPTextConfig.from_dict(d) if text else None,
                              projection_dim=d.get("projection_dim", 512), logit_scale="logit_scale" in sd)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a usable CLIP config ({e})") from None
    text_sd = {k.removeprefix(TEXT): v for k, v in sd.items() if k.startswith(TEXT)}
    projection = sd["visual_projection.weight" if vision else "text_projection.weight"]
    return CLIPConfig(vision=infer_vision_config(sd) if vision else None,
                      text=config_from_state_dict(text_sd) if text else None,
                      projection_dim=projection.shape[0], logit_scale="logit_scale" in sd)


def load_clip(path: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedCLIP:
    """A CLIP model with its projection(s) from a folder (config.json + the weights as common/state_dict.py
    `find_weights` finds them: model.safetensors, shards, or a pickle
    [+ preprocessor_config.json, tokenizer files]) or a bare .safetensors (architecture from shapes),
    strictly: every tensor of the file is loaded, and every missing, unexpected or mis-shaped one is named."""
    path = Path(path)
    weights, folder = (find_weights(path, "transformers"), path) if path.is_dir() else (path, None)
    source = str(weights)
    tensors = read_weights(weights, dtype=dtype) if path.is_dir() else read_safetensors(weights, dtype=dtype)
    vision, text = check_clip_keys(list(tensors), source=source)
    sd = rename(tensors, CLIP_KEYS)
    check_finite(sd, source=source)
    config = read_config(folder, sd, vision, text)
    with empty_model():
        model = CLIPModel(config)
    load_strict(model, sd, source=source, dtype=dtype)
    preprocess = None
    if vision:
        try:
            preprocess = clip_preprocess_config(folder, config.vision.image_size)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return LoadedCLIP(model=model.eval(), preprocess=preprocess, folder=folder, source=source)
