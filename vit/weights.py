"""Loading and saving ViT checkpoints by key mapping.

Three public layouts name the same tensors differently. Each table below is the whole story for its
layout: one row per tensor family, `{i}` a block index, `{w}` weight/bias and `{rest}` the rest of a
key (common/state_dict.py's KeyTable). The table is read in both directions, so the export to
transformers' layout is the same data run backwards.

Our model keeps q, k and v in one fused `attn.qkv` projection (as timm and the original JAX code do);
transformers stores three separate Linear layers. `fuse_qkv`/`split_qkv` concatenate or split them
along the output dimension, in the order q, k, v.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import atomic_write, read_json
from common.state_dict import (CheckpointError, KeyTable, check_finite, check_keys, empty_model, find_weights,
                               load_strict, read_safetensors, rename, write_safetensors)
from diffusion.checkpoints.ckpt import read_weights
from vit.model import ViTConfig, ViTForImageClassification, default_labels
from vit.preprocess import PreprocessConfig

# (our name, transformers' ViTForImageClassification name).
TRANSFORMERS_KEYS = KeyTable([
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.{w}", "vit.embeddings.patch_embeddings.projection.{w}"),
    ("blocks.{i}.norm1.{w}", "vit.encoder.layer.{i}.layernorm_before.{w}"),
    ("blocks.{i}.attn.q.{w}", "vit.encoder.layer.{i}.attention.attention.query.{w}"),
    ("blocks.{i}.attn.k.{w}", "vit.encoder.layer.{i}.attention.attention.key.{w}"),
    ("blocks.{i}.attn.v.{w}", "vit.encoder.layer.{i}.attention.attention.value.{w}"),
    ("blocks.{i}.attn.proj.{w}", "vit.encoder.layer.{i}.attention.output.dense.{w}"),
    ("blocks.{i}.norm2.{w}", "vit.encoder.layer.{i}.layernorm_after.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "vit.encoder.layer.{i}.intermediate.dense.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "vit.encoder.layer.{i}.output.dense.{w}"),
    ("norm.{w}", "vit.layernorm.{w}"),
    ("head.{w}", "classifier.{w}"),
])
# google's in21k `ViTModel` files: the same names without the `vit.` prefix, and a tanh pooler that we
# do not use (the head reads [CLS] directly).
VITMODEL_KEYS = KeyTable([(ours, theirs.removeprefix("vit.")) for ours, theirs in TRANSFORMERS_KEYS.rows],
                         drop=["pooler.dense.{w}"])

# (our name, timm's VisionTransformer name): identical but for the patch projection.
TIMM_KEYS = KeyTable([
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("patch_embed.{w}", "patch_embed.proj.{w}"),
    ("blocks.{i}.{rest}", "blocks.{i}.{rest}"),  # norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2
    ("norm.{w}", "norm.{w}"),
    ("head.{w}", "head.{w}"),
])
KEYS = {"transformers": TRANSFORMERS_KEYS, "transformers-vitmodel": VITMODEL_KEYS, "timm": TIMM_KEYS}


_QKV = re.compile(r"(blocks\.\d+\.attn)\.([qkv])\.(weight|bias)")


def fuse_qkv(sd: dict) -> dict:
    """blocks.N.attn.{q,k,v}.{w} -> blocks.N.attn.qkv.{w}: concatenated along the output rows."""
    out, groups = {}, {}
    for key, value in sd.items():
        m = _QKV.fullmatch(key)
        if m:
            groups.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (prefix, w), parts in groups.items():
        missing = [f"{prefix}.{n}.{w}" for n in "qkv" if n not in parts]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)} (transformers' query/key/value)")
        out[f"{prefix}.qkv.{w}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def split_qkv(sd: dict) -> dict:
    """The inverse of `fuse_qkv`, for exporting to transformers' layout."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{m[1]}.{name}.{m[2]}"] = part.contiguous()
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedViT:
    model: ViTForImageClassification
    preprocess: PreprocessConfig
    layout: str          # "transformers", "transformers-vitmodel" or "timm"
    source: str          # the weights file
    new_head: bool       # True when the classification head was freshly initialised


def detect_layout(sd: dict, *, source: str) -> str:
    if "vit.embeddings.cls_token" in sd:
        return "transformers"
    if "embeddings.cls_token" in sd:
        return "transformers-vitmodel"
    if "cls_token" in sd and any(k.startswith("blocks.") for k in sd):
        return "timm"
    sample = ", ".join(sorted(sd)[:5])
    raise CheckpointError(f"{source}: not a ViT checkpoint (no [CLS] token in the transformers or timm "
                          f"layout; first keys: {sample})")


def to_our_names(sd: dict, layout: str) -> dict:
    ours = rename(sd, KEYS[layout])
    return ours if layout == "timm" else fuse_qkv(ours)


def infer_config(sd: dict, layout: str) -> ViTConfig:
    """Architecture from tensor shapes (our names), for a bare .safetensors with no config.json."""
    D = sd["cls_token"].shape[-1]
    P = sd["patch_embed.weight"].shape[-1]
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads = D // 64 if D % 64 == 0 else 1  # ViT convention: 64-wide heads
    num_labels = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    return ViTConfig(image_size=grid * P, patch_size=P, num_channels=sd["patch_embed.weight"].shape[1],
                     hidden_size=D, num_layers=layers, num_heads=heads,
                     mlp_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
                     layer_norm_eps=1e-6 if layout == "timm" else 1e-12,
                     qkv_bias="blocks.0.attn.qkv.bias" in sd, labels=default_labels(num_labels))


def _timm_config(d: dict, sd: dict) -> tuple[ViTConfig, PreprocessConfig | None]:
    """timm's config.json holds the architecture name and pretrained_cfg; shapes give the rest."""
    config = infer_config(sd, "timm")
    args = d.get("model_args", {})  # written by timm when the model was built with non-default args
    if "num_heads" in args:
        config.num_heads = int(args["num_heads"])
    labels = d.get("label_names") or config.labels
    config.labels = list(labels)
    pre = d.get("pretrained_cfg", {})
    pp = None
    if "mean" in pre and "std" in pre:
        pp = PreprocessConfig(size=(config.image_size, config.image_size),
                              image_mean=list(pre["mean"]), image_std=list(pre["std"]))
    return config, pp


def load_vit(path: str | Path, *, labels: list[str] | None = None) -> LoadedViT:
    """Load a ViT classifier from a folder or a .safetensors file, strictly.

    path: a transformers folder (config.json + model.safetensors [+ preprocessor_config.json]; the weights
    may be sharded, or a pickle read by the restricted unpickler: common/state_dict.py `find_weights`), a
    timm folder or file, or a bare .safetensors (architecture from shapes). `labels`: when given and
    different from the checkpoint's (or when the checkpoint has no head, like google's in21k ViTModel),
    a new head of len(labels) outputs is initialised for fine-tuning. `labels=[]`: a backbone without a
    head (vit/dino.py), whose forward gives the [CLS] features; a checkpoint with a head is refused then.
    """
    path = Path(path)
    if path.is_dir():
        weights, folder = find_weights(path, "transformers"), path
    else:
        weights, folder = path, path.parent
    sd = read_weights(weights) if path.is_dir() else read_safetensors(weights)   # a file named by the user: safetensors
    source = str(weights)
    check_finite(sd, source=source)     # under the file's own names (load_strict checks again, under ours)
    layout = detect_layout(sd, source=source)
    ours = to_our_names(sd, layout)
    for key in ("cls_token", "patch_embed.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in ours:
            raise CheckpointError(f"{source}: missing {key} (as named in our model); not a complete ViT")

    config_path, pp_path = folder / "config.json", folder / "preprocessor_config.json"
    preprocess = None
    if config_path.exists():
        try:
            d = read_json(config_path)
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, not {type(d).__name__}")
            if layout == "timm" or "architecture" in d:
                config, preprocess = _timm_config(d, ours)
            else:
                config = ViTConfig.from_hf_dict(d)
                if "head.weight" not in ours and "id2label" not in d:
                    config.labels = []
        except (ValueError, TypeError) as e:   # json.JSONDecodeError is a ValueError
            raise CheckpointError(f"{config_path}: not a usable ViT config ({e})") from e
        source = f"{weights} with {config_path}"
    else:
        config = infer_config(ours, layout)
    if pp_path.exists():
        try:
            preprocess = PreprocessConfig.from_json(pp_path)   # its message names the file
        except ValueError as e:
            raise CheckpointError(str(e)) from e
    if preprocess is None:
        preprocess = PreprocessConfig(size=(config.image_size, config.image_size))

    has_head = "head.weight" in ours
    if has_head and labels is not None and not labels:
        raise CheckpointError(f"{source}: a ViT classifier (a head of {ours['head.weight'].shape[0]} outputs), "
                              "not a backbone without a head")
    ckpt_labels = config.labels if has_head else None
    new_head = bool(labels) and list(labels) != ckpt_labels
    if labels is not None:
        config.labels = list(labels)
    elif not has_head:
        raise CheckpointError(f"{source}: this checkpoint has no classification head (a {layout} backbone); "
                              "give the labels to fine-tune a new head (train_emotion.py does)")
    if has_head and not new_head and ours["head.weight"].shape[0] != config.num_labels:
        raise CheckpointError(f"{source}: head has {ours['head.weight'].shape[0]} outputs but the config "
                              f"names {config.num_labels} labels")
    if new_head:
        ours = {k: v for k, v in ours.items() if not k.startswith("head.")}

    with empty_model():  # no memory for weights that the checkpoint replaces right away
        model = ViTForImageClassification(config)
    if new_head:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")}
        check_keys(expected, {k: tuple(v.shape) for k, v in ours.items()}, source=source)
        head = torch.nn.Linear(config.hidden_size, config.num_labels)
        torch.nn.init.trunc_normal_(head.weight, std=0.02)   # as a fresh model's head
        torch.nn.init.zeros_(head.bias)
        ours = {**ours, "head.weight": head.weight.detach(), "head.bias": head.bias.detach()}
    load_strict(model, ours, source=source)
    return LoadedViT(model=model.eval(), preprocess=preprocess, layout=layout, source=str(weights),
                     new_head=new_head)


# ---------------------------------------------------------------------------------------------------
def transformers_state_dict(model: ViTForImageClassification) -> dict[str, torch.Tensor]:
    """Our weights under transformers' ViTForImageClassification names (q, k, v split again)."""
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    return rename(split_qkv(sd), TRANSFORMERS_KEYS, reverse=True)


def save_pretrained(model: ViTForImageClassification, preprocess: PreprocessConfig, folder: str | Path) -> Path:
    """Write a folder that transformers' `ViTForImageClassification.from_pretrained` loads unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = transformers_state_dict(model)
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    for name, content in (("config.json", model.config.to_hf_dict()),
                          ("preprocessor_config.json", preprocess.to_hf_dict())):
        text = json.dumps(content, indent=2) + "\n"
        atomic_write(folder / name, lambda p, t=text: Path(p).write_text(t))
    return folder
