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

SD 2.x's single files hold a fifth layout: the OpenCLIP model itself (LDM's FrozenOpenCLIPEmbedder,
its image tower deleted), under `cond_stage_model.model.`:

    token_embedding.weight, positional_embedding                        our token/position embeddings
    transformer.resblocks.{i}.ln_1 / attn.in_proj_weight / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj
    ln_final                                                            our final_layer_norm
    text_projection, logit_scale, the last block                        not used by SD 2 (dropped, as diffusers drops them)

Its attention is torch's nn.MultiheadAttention, whose q, k and v projections are one fused tensor
`in_proj_weight` (3D, D) (and `in_proj_bias`): `split_in_proj` cuts it into three row blocks named
`in_proj_weight#q`, `#k`, `#v`, which the table OPENCLIP_KEYS reads like any other key, and `fuse_in_proj`
joins them back when saving. SD 2 reads the penultimate block ("penultimate": FrozenOpenCLIPEmbedder's
default layer), so our model has one layer less than the file has blocks; `openclip_layers` says how
many a file's blocks give, and a file lacking one of them is refused naming the blocks.

SDXL's single files (sgm's GeneralConditioner) hold two towers, each under its embedder's prefix:

    conditioner.embedders.0.transformer.text_model.*   OpenAI's ViT-L/14 in transformers' names (SDXL_CLIP_PREFIX)
    conditioner.embedders.1.model.*                    OpenCLIP ViT-bigG/14 in its own names (SDXL_OPENCLIP_PREFIX),
                                                       every block run, and its text_projection used

SDXL's second encoder is transformers' CLIPTextModelWithProjection (`with_projection`): its
`text_projection.weight` (projection_dim, D) beside `text_model.*` in a folder; OpenCLIP keeps the same map
as a parameter (D, projection_dim) applied as `x @ text_projection`, its transpose: `transpose_projection`
names that transpose `text_projection#T` (a view), which the table reads like any other key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from clip.text_model import OPEN_CLIP_VIT_H14, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from common.state_dict import (CheckpointError, KeyTable, empty_model, find_weights, listing, load_strict,
                               read_safetensors, rename, safetensors_header)
from diffusion.checkpoints.ckpt import read_weights

HEAD_WIDTH = 64                  # every OpenAI CLIP text tower uses 64-wide heads (ViT-L/14: 768 = 12 x 64)
SD_PREFIX = "cond_stage_model."  # everything of SD's text encoder in an original single file lives here
# The prefixes above, and the two that SD v1 writes: its folder's text_encoder/ and its single file's.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."   # SDXL's first tower in its single file
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."                # SDXL's second (OpenCLIP bigG), all blocks
PREFIXES = ("", "text_model.", "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.",
            SDXL_CLIP_PREFIX)
FOLDER_PREFIX, SINGLE_FILE_PREFIX = "text_model.", "cond_stage_model.transformer.text_model."
PROJECTION = "text_projection.weight"   # CLIPTextModelWithProjection's, beside any of the prefixes' keys
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


def text_table(prefix: str, *, with_projection: bool = False) -> KeyTable:
    """TEXT_KEYS below one key prefix, e.g. FOLDER_PREFIX for a diffusers folder's text_encoder/; with
    `with_projection`, CLIPTextModelWithProjection's text_projection too (not below the prefix)."""
    return KeyTable([(ours, prefix + theirs) for ours, theirs in TEXT_KEYS]
                    + ([(PROJECTION, PROJECTION)] if with_projection else []),
                    drop=[prefix + "embeddings.position_ids"])


def text_prefix(keys: Iterable[str]) -> str | None:
    """The one of PREFIXES that the file's keys use, read off its token embedding; None if none does
    (OPENCLIP_PREFIX for SD 2.x's OpenCLIP layout)."""
    keys = list(keys)
    for prefix in (OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    found = [k.removesuffix(TOKEN_EMBEDDING) for k in keys if k.endswith(TOKEN_EMBEDDING)]
    return found[0] if len(found) == 1 and found[0] in PREFIXES else None


# ---- SD 2.x's single files: OpenCLIP's own names ----------------------------------------------------
OPENCLIP_PREFIX = "cond_stage_model.model."
# (our name, OpenCLIP's name below OPENCLIP_PREFIX); `#q` is the first third of the fused in-projection's
# rows (see `split_in_proj`), `#k` the second, `#v` the last, as nn.MultiheadAttention splits them.
OPENCLIP_KEYS = [
    ("token_embedding.weight", "token_embedding.weight"),
    ("position_embedding.weight", "positional_embedding"),          # an nn.Parameter (77, D), not an Embedding
    ("layers.{i}.layer_norm1.{w}", "transformer.resblocks.{i}.ln_1.{w}"),
    ("layers.{i}.self_attn.q_proj.{w}", "transformer.resblocks.{i}.attn.in_proj_{w}#q"),
    ("layers.{i}.self_attn.k_proj.{w}", "transformer.resblocks.{i}.attn.in_proj_{w}#k"),
    ("layers.{i}.self_attn.v_proj.{w}", "transformer.resblocks.{i}.attn.in_proj_{w}#v"),
    ("layers.{i}.self_attn.out_proj.{w}", "transformer.resblocks.{i}.attn.out_proj.{w}"),
    ("layers.{i}.layer_norm2.{w}", "transformer.resblocks.{i}.ln_2.{w}"),
    ("layers.{i}.mlp.fc1.{w}", "transformer.resblocks.{i}.mlp.c_fc.{w}"),
    ("layers.{i}.mlp.fc2.{w}", "transformer.resblocks.{i}.mlp.c_proj.{w}"),
    ("final_layer_norm.{w}", "ln_final.{w}"),
]
# What the OpenCLIP model holds beside the tower SD 2 runs: the projection into the joint image-text
# space and the contrastive temperature (SD 2 uses neither), and the causal mask as a buffer (older
# open_clip saved it; we build our own).
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")
IN_PROJ = re.compile(r".+\.attn\.in_proj_(?:weight|bias)")
BLOCK = re.compile(re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
SDXL_BLOCK = re.compile(re.escape(SDXL_OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
# SDXL runs the whole tower and projects its pooled output: OpenCLIP's (D, P) parameter, transposed (`#T`).
OPENCLIP_PROJECTION_KEYS = [(PROJECTION, "text_projection#T")]


def openclip_table(num_layers: int, prefix: str = OPENCLIP_PREFIX) -> KeyTable:
    """OPENCLIP_KEYS below `prefix`. SD 2.x (OPENCLIP_PREFIX), for a text encoder of `num_layers` layers: the
    file's block `num_layers` (its last, which SD 2 does not run) and OPENCLIP_UNUSED are dropped. SDXL
    (SDXL_OPENCLIP_PREFIX): every block and the projection (`transpose_projection`) are read, the
    temperature and any saved mask dropped."""
    if prefix == SDXL_OPENCLIP_PREFIX:
        return KeyTable([(ours, prefix + theirs) for ours, theirs in OPENCLIP_KEYS + OPENCLIP_PROJECTION_KEYS],
                        drop=[prefix + name for name in OPENCLIP_UNUSED if name != "text_projection"])
    return KeyTable([(ours, prefix + theirs) for ours, theirs in OPENCLIP_KEYS],
                    drop=[prefix + name for name in OPENCLIP_UNUSED]
                    + [f"{prefix}transformer.resblocks.{num_layers}.{{rest}}"])


def transpose_projection(state_dict: dict) -> dict:
    """OpenCLIP's `...text_projection` (D, P), applied as x @ P, as `...text_projection#T` (P, D): the weight
    of the same map as a Linear (a view, no copy). Values that are not tensors are kept."""
    return {(f"{k}#T" if k.endswith(".text_projection") else k):
            (v.t() if k.endswith(".text_projection") and isinstance(v, torch.Tensor) else v)
            for k, v in state_dict.items()}


def untranspose_projection(state_dict: dict) -> dict:
    """The inverse of `transpose_projection`, for saving."""
    return {k.removesuffix("#T"): (v.t() if k.endswith("#T") else v) for k, v in state_dict.items()}


def split_in_proj(state_dict: dict) -> dict:
    """Every fused `...attn.in_proj_weight` (3D, D) / `in_proj_bias` (3D,) as three row blocks
    `...in_proj_weight#q`, `#k`, `#v` (views, no copy): nn.MultiheadAttention computes q, k, v as those
    thirds of one matmul. Values that are not tensors (names, as porting pairs them) are repeated."""
    out = {}
    for key, value in state_dict.items():
        if not IN_PROJ.fullmatch(key):
            out[key] = value
            continue
        if isinstance(value, torch.Tensor) and value.shape[0] % 3:
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} is not three equal q, k, v blocks")
        parts = value.chunk(3, dim=0) if isinstance(value, torch.Tensor) else [value] * 3
        out.update({f"{key}#{name}": part for name, part in zip("qkv", parts)})
    return out


def fuse_in_proj(state_dict: dict) -> dict:
    """The inverse of `split_in_proj`: `X#q`, `X#k`, `X#v` concatenated (in that order) into `X`."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        base, sep, name = key.rpartition("#")
        if sep and name in ("q", "k", "v"):
            parts.setdefault(base, {})[name] = value
        else:
            out[key] = value
    for base, thirds in parts.items():
        missing = [f"{base}#{n}" for n in "qkv" if n not in thirds]
        if missing:
            raise CheckpointError(f"{base}: its {', '.join(missing)} part is missing (q, k and v make one in_proj)")
        out[base] = torch.cat([thirds["q"], thirds["k"], thirds["v"]], dim=0)
    return out


def openclip_layers(keys: Iterable[str], *, width: int | None, source: str) -> int:
    """How many layers of our model an OpenCLIP tower in a file gives: SD 2 runs all its blocks but the
    last. LDM saves the whole tower (with its text_projection): its blocks minus one. diffusers' converter
    (scripts/convert_diffusers_to_original_stable_diffusion.py) writes only the blocks SD 2 runs, and no
    text_projection: all of them. The blocks must be 0, 1, ... without a gap, and OpenCLIP ViT-H/14's
    (width 1024) must give SD 2's 23; otherwise the file lacks blocks and is refused naming them."""
    keys = list(keys)
    blocks = sorted({int(m.group(1)) for k in keys if (m := BLOCK.match(k))})
    gaps = sorted(set(range(max(blocks, default=-1) + 1)) - set(blocks))
    whole = OPENCLIP_PREFIX + "text_projection" in keys
    layers = len(blocks) - whole
    what = f"{source}: the OpenCLIP ViT-H/14 text tower of SD 2.x in this file"
    if not blocks:
        raise CheckpointError(f"{what} has no transformer block ({OPENCLIP_PREFIX}transformer.resblocks.*)")
    if gaps:
        raise CheckpointError(f"{what} lacks transformer block(s) {', '.join(map(str, gaps))} of 0..{blocks[-1]} "
                              f"({OPENCLIP_PREFIX}transformer.resblocks.N.*)")
    expected = OPEN_CLIP_VIT_H14["num_hidden_layers"]
    if width == OPEN_CLIP_VIT_H14["hidden_size"] and layers != expected:
        have = f"blocks 0..{blocks[-1]}" + (" and its text_projection" if whole else "")
        raise CheckpointError(f"{what} lacks blocks: it holds {have}, which give {layers} layers; SD 2 runs "
                              f"{expected} (blocks 0..{expected - 1} of the tower's {expected + 1})")
    return layers


# The rest of a full CLIPModel (beside text_model.*), recognised and not loaded: the vision tower, the
# two projections into the joint image-text space, the contrastive temperature.
CLIP_MODEL_OTHERS = ("vision_model.", "visual_projection.weight", "text_projection.weight", "logit_scale")


def text_encoder_state_dict(state_dict: dict[str, torch.Tensor], *, source: str,
                            num_layers: int | None = None, with_projection: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP text tower in any of the layouts above -> tensors under our names.

    For an SD single file pass the whole file: only its `cond_stage_model.` keys are the text
    encoder's (the UNet and VAE keys belong to diffusion/checkpoints/load.py). Any other key that the
    table does not recognise stops the load with a CheckpointError naming it; `source` names the file
    in messages. `num_layers` (an OpenCLIP tower only): the layers of the model to load, from its
    config; else what the file's blocks give (`openclip_layers`). `with_projection`: the tower of a
    CLIPTextModelWithProjection, its text_projection read (SDXL's second encoder; always so for SDXL's
    OpenCLIP tower, `conditioner.embedders.1.model.*`).
    """
    if any(k.startswith(SD_PREFIX) for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(SD_PREFIX)}
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        return _openclip_state_dict(state_dict, source=source, num_layers=num_layers)
    if any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in state_dict):
        return _sdxl_openclip_state_dict(state_dict, source=source)
    others = tuple(o for o in CLIP_MODEL_OTHERS if not (with_projection and o == PROJECTION))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(others)}
    prefix = text_prefix(state_dict)
    if prefix is None:
        raise CheckpointError(f"{source}: no CLIP text encoder found: no tensor named {TOKEN_EMBEDDING} after one of "
                              f"the prefixes {', '.join(map(repr, PREFIXES))}, nor {OPENCLIP_PREFIX}* (the file holds: "
                              f"{listing(sorted(state_dict), 10) or 'nothing'})")
    table = text_table(prefix, with_projection=with_projection)
    unknown = sorted(k for k in state_dict if table.name(k) is None and not table.drops(k))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not part of a CLIP text encoder: "
                              f"{listing(unknown, 10)}")
    return rename(state_dict, table)


def _sdxl_openclip_state_dict(state_dict: dict, *, source: str) -> dict:
    """SDXL's OpenCLIP ViT-bigG/14 tower (`conditioner.embedders.1.model.*`) -> our names: every block (SDXL
    reads the penultimate one's states, and the pooled output after the last), in_proj split, projection
    transposed. Blocks must be 0, 1, ... without a gap."""
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := SDXL_BLOCK.match(k))})
    gaps = sorted(set(range(max(blocks, default=-1) + 1)) - set(blocks))
    if not blocks or gaps:
        raise CheckpointError(f"{source}: SDXL's OpenCLIP ViT-bigG/14 text tower ({SDXL_OPENCLIP_PREFIX}*) "
                              + (f"lacks transformer block(s) {', '.join(map(str, gaps))} of 0..{blocks[-1]}" if blocks
                                 else "has no transformer block") + f" ({SDXL_OPENCLIP_PREFIX}transformer.resblocks.N.*)")
    tensors = transpose_projection(split_in_proj(state_dict))
    table = openclip_table(len(blocks), SDXL_OPENCLIP_PREFIX)
    unknown = sorted(k for k in tensors if table.name(k) is None and not table.drops(k))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not part of SDXL's OpenCLIP text tower: "
                              f"{listing(unknown, 10)}")
    return rename(tensors, table)


def _openclip_state_dict(state_dict: dict, *, source: str, num_layers: int | None) -> dict:
    """SD 2.x's OpenCLIP text tower (`cond_stage_model.model.*`) -> our names, its in_proj split."""
    embedding = state_dict.get(OPENCLIP_PREFIX + "token_embedding.weight")
    width = embedding.shape[1] if isinstance(embedding, torch.Tensor) else None
    layers = openclip_layers(state_dict, width=width, source=source)
    if num_layers is not None:   # the config's count: its blocks must all be in the file (one more may be)
        have = sorted({int(m.group(1)) for k in state_dict if (m := BLOCK.match(k))})
        missing = [i for i in range(num_layers) if i not in have]
        if missing:
            raise CheckpointError(f"{source}: the OpenCLIP ViT-H/14 text tower of SD 2.x in this file lacks transformer "
                                  f"block(s) {', '.join(map(str, missing))}: the config's {num_layers} layers need "
                                  f"blocks 0..{num_layers - 1}")
        layers = num_layers
    tensors = split_in_proj(state_dict)
    table = openclip_table(layers)
    unknown = sorted(k for k in tensors if table.name(k) is None and not table.drops(k))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not part of SD 2.x's OpenCLIP text tower: "
                              f"{listing(unknown, 10)}")
    ours = rename(tensors, table)
    beyond = sorted(k for k in ours if (m := re.match(r"layers\.(\d+)\.", k)) and int(m.group(1)) >= layers)
    if beyond:   # a block past the one SD 2 leaves out: not a tower of this depth
        raise CheckpointError(f"{source}: {OPENCLIP_PREFIX}transformer.resblocks.{layers + 1}.* and after: more blocks "
                              f"than a text encoder of {layers} layers (plus the one SD 2 leaves out) has")
    return ours


def source_table(keys: Iterable[str], *, num_layers: int) -> KeyTable:
    """The key table of the layout a text encoder's file uses (its names as `split_in_proj` gives them for
    OpenCLIP), for a model of `num_layers` layers: what loading read, for saving back under the same names."""
    prefix = text_prefix(keys)
    if prefix in (OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX):
        return openclip_table(num_layers, prefix)
    return text_table(prefix, with_projection=PROJECTION in set(keys))


def single_file_text_table(config: CLIPTextConfig) -> KeyTable:
    """The table by which an SD single file names a text encoder of this config: OpenCLIP's names for an
    OpenCLIP tower (SD 2.x), SD v1's under cond_stage_model.transformer.text_model. otherwise. The two
    families' towers differ in their activation: OpenAI's CLIP was trained with its sigmoid approximation
    (quick_gelu), OpenCLIP with the exact GELU (diffusers' converter tells them apart by depth, 23 layers
    or more, which a tiny tower does not have)."""
    return openclip_table(config.num_hidden_layers) if config.hidden_act == "gelu" else text_table(SINGLE_FILE_PREFIX)


def config_from_state_dict(state_dict: dict[str, torch.Tensor], *, openclip: bool = False,
                           **overrides) -> CLIPTextConfig:
    """The architecture read off tensor shapes (in our key names); heads are HEAD_WIDTH wide.

    What shapes cannot tell (activation, eps, token ids) comes from the preset of the file's family:
    ViT-L/14 (SD v1), or with `openclip` (an SD 2.x file's OpenCLIP layout) ViT-H/14: exact GELU; an
    OpenCLIP tower with its text_projection is SDXL's ViT-bigG/14 (exact GELU, projection_dim from the shape).
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
    if PROJECTION in state_dict:
        shapes["projection_dim"] = state_dict[PROJECTION].shape[0]
    preset = (CLIPTextConfig.vit_l14 if not openclip else CLIPTextConfig.open_clip_vit_bigg14
              if PROJECTION in state_dict else CLIPTextConfig.open_clip_vit_h14)
    return preset(**{**shapes, **overrides})


def _read_text_tensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or only the cond_stage_model.* ones of an SD single file
    (its UNet and VAE tensors, ~3 GB of the 4 GB, are not read)."""
    header = safetensors_header(path)[0]
    single_file = any(k.startswith(SD_PREFIX) for k in header)
    return read_safetensors(path, dtype=dtype, keys=(lambda k: k.startswith(SD_PREFIX)) if single_file else None)


def load_text_encoder(path: str | Path, *, config: CLIPTextConfig | None = None,
                      dtype: torch.dtype = torch.float32, variant: str | None = None,
                      with_projection: bool = False) -> CLIPTextModel:
    """A CLIPTextModel from a folder (config.json + model.safetensors, or its `variant`, sharded or pickled:
    common/state_dict.py `find_weights`) or a .safetensors file, in eval mode, its weights in `dtype` (on
    the file's pages when already so, see common/state_dict.py).

    Without a config.json or a `config`, the architecture is inferred from the tensor shapes.
    `with_projection`: a CLIPTextModelWithProjection (SDXL's text_encoder_2/), its text_projection read.
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
    state_dict = text_encoder_state_dict(tensors, source=str(weights), with_projection=with_projection,
                                         num_layers=config.num_hidden_layers if config is not None else None)
    if config is None:
        config = config_from_state_dict(state_dict, openclip=text_prefix(tensors) in (OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX))
    width = state_dict["token_embedding.weight"].shape[1] if "token_embedding.weight" in state_dict else None
    if width is not None and width != config.hidden_size:
        raise CheckpointError(f"{weights}: the text encoder in this file is {width} wide, but the config says "
                              f"hidden_size={config.hidden_size} (SD v1's CLIP ViT-L/14 is 768 wide; SD 2.x's "
                              "OpenCLIP ViT-H/14 is 1024)")
    with empty_model():
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    load_strict(model, state_dict, source=str(weights), dtype=dtype)
    return model.eval()
