"""Loading CLIP text encoders by key mapping, strictly.

The same tensors reach us under four prefixes:

    text_model.embeddings.token_embedding.weight                       SD v1 folder's text_encoder/ (transformers 4)
    embeddings.token_embedding.weight                                  CLIPTextModel saved by transformers 5
    text_model.embeddings.token_embedding.weight + vision_model.*      a full CLIPModel (text + vision towers)
    cond_stage_model.transformer.text_model.embeddings.token_...       an original SD v1 single file
    cond_stage_model.transformer.embeddings.token_...                  the same without text_model. (some early SD v1 files)

Below each prefix the names are transformers' CLIPTextModel names; ours drop the `embeddings.` and
`encoder.` levels. The whole mapping is the table TEXT_KEYS, put below a file's prefix by
`text_table(prefix)` (a KeyTable of common/state_dict.py, read in both directions: loading and
saving). A file's prefix is what precedes its `embeddings.token_embedding.weight`. `position_ids` (a
saved copy of 0..76 that older transformers kept in the file, and that some merged SD checkpoints carry
as not-quite-integer floats) is dropped: we compute positions ourselves.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from clip.text_model import CLIPTextConfig, CLIPTextModel
from common.state_dict import (CheckpointError, KeyTable, empty_model, find_weights, listing, load_strict,
                               read_safetensors, rename, safetensors_header)
from diffusion.checkpoints.ckpt import read_weights

HEAD_WIDTH = 64                  # every OpenAI CLIP text tower uses 64-wide heads (ViT-L/14: 768 = 12 x 64)
SD_PREFIX = "cond_stage_model."  # everything of SD's text encoder in an original single file lives here
# The prefixes above, and the two that SD v1 writes: its folder's text_encoder/ and its single file's.
PREFIXES = ("", "text_model.", "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")
FOLDER_PREFIX, SINGLE_FILE_PREFIX = "text_model.", "cond_stage_model.transformer.text_model."
TOKEN_EMBEDDING = "embeddings.token_embedding.weight"

# (our name, transformers' CLIPTextModel name below the file's prefix).
TEXT_KEYS = [
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("position_embedding.weight", "embeddings.position_embedding.weight"),
    ("layers.{i}.layer_norm1.{w}", "encoder.layers.{i}.layer_norm1.{w}"),
    ("layers.{i}.self_attn.q_proj.{w}", "encoder.layers.{i}.self_attn.q_proj.{w}"),
    ("layers.{i}.self_attn.k_proj.{w}", "encoder.layers.{i}.self_attn.k_proj.{w}"),
    ("layers.{i}.self_attn.v_proj.{w}", "encoder.layers.{i}.self_attn.v_proj.{w}"),
    ("layers.{i}.self_attn.out_proj.{w}", "encoder.layers.{i}.self_attn.out_proj.{w}"),
    ("layers.{i}.layer_norm2.{w}", "encoder.layers.{i}.layer_norm2.{w}"),
    ("layers.{i}.mlp.fc1.{w}", "encoder.layers.{i}.mlp.fc1.{w}"),
    ("layers.{i}.mlp.fc2.{w}", "encoder.layers.{i}.mlp.fc2.{w}"),
    ("final_layer_norm.{w}", "final_layer_norm.{w}"),
]


def text_table(prefix: str) -> KeyTable:
    """TEXT_KEYS below one key prefix, e.g. FOLDER_PREFIX for a diffusers folder's text_encoder/."""
    return KeyTable([(ours, prefix + theirs) for ours, theirs in TEXT_KEYS],
                    drop=[prefix + "embeddings.position_ids"])


def text_prefix(keys: Iterable[str]) -> str | None:
    """The one of PREFIXES that the file's keys use, read off its token embedding; None if none does."""
    found = [k.removesuffix(TOKEN_EMBEDDING) for k in keys if k.endswith(TOKEN_EMBEDDING)]
    return found[0] if len(found) == 1 and found[0] in PREFIXES else None


# The rest of a full CLIPModel (beside text_model.*), recognised and not loaded: the vision tower, the
# two projections into the joint image-text space, the contrastive temperature.
CLIP_MODEL_OTHERS = ("vision_model.", "visual_projection.weight", "text_projection.weight", "logit_scale")


def text_encoder_state_dict(state_dict: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """A CLIP text tower in any of the layouts above -> tensors under our names.

    For an SD v1 single file pass the whole file: only its `cond_stage_model.` keys are the text
    encoder's (the UNet and VAE keys belong to diffusion/checkpoints/load.py). Any other key that the
    table does not recognise stops the load with a CheckpointError naming it; `source` names the file
    in messages.
    """
    if any(k.startswith(SD_PREFIX) for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(SD_PREFIX)}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLIP_MODEL_OTHERS)}
    hint = ""
    if any(k.startswith("cond_stage_model.model.") for k in state_dict):
        hint = (" (cond_stage_model.model.* is the OpenCLIP ViT-H/14 text tower of SD 2.x, "
                "which this CLIP-L loader does not read)")
    prefix = text_prefix(state_dict)
    if prefix is None:
        raise CheckpointError(f"{source}: no CLIP text encoder found: no tensor named {TOKEN_EMBEDDING} after one of "
                              f"the prefixes {', '.join(map(repr, PREFIXES))} (the file holds: "
                              f"{listing(sorted(state_dict), 10) or 'nothing'}){hint}")
    table = text_table(prefix)
    unknown = sorted(k for k in state_dict if table.name(k) is None and not table.drops(k))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not part of a CLIP text encoder: "
                              f"{listing(unknown, 10)}{hint}")
    return rename(state_dict, table)


def config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides) -> CLIPTextConfig:
    """The architecture read off tensor shapes (in our key names); heads are HEAD_WIDTH wide.

    What shapes cannot tell (activation, eps, token ids) comes from the ViT-L/14 preset, i.e. SD v1.
    """
    if "token_embedding.weight" not in state_dict or "layers.0.mlp.fc1.weight" not in state_dict:
        raise CheckpointError("cannot infer a CLIP text config: token_embedding.weight or "
                              "layers.0.mlp.fc1.weight is missing")
    vocab_size, width = state_dict["token_embedding.weight"].shape
    if width % HEAD_WIDTH and "num_attention_heads" not in overrides:
        raise CheckpointError(f"cannot infer the number of heads: width {width} is not a multiple of "
                              f"{HEAD_WIDTH}; pass a config (e.g. the folder's config.json)")
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k)))
    shapes = dict(vocab_size=vocab_size, hidden_size=width,
                  max_position_embeddings=state_dict["position_embedding.weight"].shape[0],
                  intermediate_size=state_dict["layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=layers, num_attention_heads=width // HEAD_WIDTH)
    return CLIPTextConfig.vit_l14(**{**shapes, **overrides})


def _read_text_tensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or only the cond_stage_model.* ones of an SD v1 single file
    (its UNet and VAE tensors, ~3 GB of the 4 GB, are not read)."""
    header = safetensors_header(path)[0]
    single_file = any(k.startswith(SD_PREFIX) for k in header)
    return read_safetensors(path, dtype=dtype, keys=(lambda k: k.startswith(SD_PREFIX)) if single_file else None)


def load_text_encoder(path: str | Path, *, config: CLIPTextConfig | None = None,
                      dtype: torch.dtype = torch.float32, variant: str | None = None) -> CLIPTextModel:
    """A CLIPTextModel from a folder (config.json + model.safetensors, or its `variant`, sharded or pickled:
    common/state_dict.py `find_weights`) or a .safetensors file, in eval mode, its weights in `dtype` (on
    the file's pages when already so, see common/state_dict.py).

    Without a config.json or a `config`, the architecture is inferred from the tensor shapes.
    """
    path = Path(path)
    if path.is_dir():
        weights = find_weights(path, "transformers", variant=variant)
        if config is None and (path / "config.json").exists():
            config = CLIPTextConfig.from_json(path / "config.json")
    else:
        weights = path
    # a folder's weights as transformers reads them (sharded, or a pickle); a file named by the user: safetensors
    tensors = read_weights(weights, dtype=dtype) if path.is_dir() else _read_text_tensors(weights, dtype)
    state_dict = text_encoder_state_dict(tensors, source=str(weights))
    if config is None:
        config = config_from_state_dict(state_dict)
    width = state_dict["token_embedding.weight"].shape[1] if "token_embedding.weight" in state_dict else None
    if width is not None and width != config.hidden_size:
        raise CheckpointError(f"{weights}: the text encoder in this file is {width} wide, but the config says "
                              f"hidden_size={config.hidden_size} (SD v1's CLIP ViT-L/14 is 768 wide; SD 2.x's "
                              "OpenCLIP ViT-H/14 is 1024)")
    with empty_model():
        model = CLIPTextModel(config)
    load_strict(model, state_dict, source=str(weights), dtype=dtype)
    return model.eval()
