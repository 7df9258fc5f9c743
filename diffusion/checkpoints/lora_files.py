"""LoRA files, read and written in the two public formats, mapped onto our module names strictly.

    diffusers  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (peft, new)
               unet.down_blocks.0. ... .attn1.to_q.lora.down.weight                             (train_dreambooth_lora)
               unet.down_blocks.0. ... .attn1.processor.to_q_lora.down.weight                   (attention processors, old)
               text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight
               (the same without the unet./text_encoder. prefix: a UNet key, or a text_model. key)
               alpha: the file's "lora_adapter_metadata" (peft's lora_alpha, alpha_pattern), else alpha = rank
    kohya      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
               lora_unet_..._attn1_to_q.lora_up.weight, lora_unet_..._attn1_to_q.alpha (a scalar)
               lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
               (kohya's SD v1 names are diffusers' module names with "." written "_"; conv keys, e.g.
               ..._resnets_0_conv1, carry 4-d tensors)
    SDXL       diffusers: also text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
               kohya (sd-scripts' SDXL): lora_te1_text_model_..., lora_te2_text_model_... for the two text
               encoders, and the UNet under sgm's (LDM's) module names, diffusion/checkpoints/single_file.py
               `unet_table`: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q,
               lora_unet_middle_block_0_in_layers_2, lora_unet_output_blocks_2_2_conv, ... (diffusers' names
               are accepted too, as diffusers' converter accepts them)

Every key must map onto a Linear or Conv2d of our UNet or text encoder, with shapes that fit, before
anything is applied: an unknown key is an error naming it (or, asked for, a skipped key that is
printed), a mis-shaped one an error naming the key and both shapes (an SD 2 or SDXL LoRA on SD v1).
Pickle files are refused as every pickle is (common/state_dict.py), and so is a file holding NaN or
infinity, in a tensor or in an alpha (`check_finite`), and a fused model that is not finite.
A scale is a finite number within +-MAX_SCALE.
"""
from __future__ import annotations

import json
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.hub_cache import resolve_model
from common.state_dict import (CheckpointError, check_finite, listing, read_safetensors, safetensors_metadata,
                               write_safetensors)
from diffusion import lora

PARTS = ("unet", "text_encoder")
SDXL_PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Our text encoder drops transformers' `text_model.encoder.` levels (clip/weights.py): one rule each way.
TEXT_THEIRS = "text_model.encoder."

# (regex over a key without its part prefix: group 1 is the module, role): written as data, in one screen.
KEY_FORMS = [
    (r"(.+)\.lora_A\.weight", "down"), (r"(.+)\.lora_B\.weight", "up"),                     # peft
    (r"(.+)\.lora\.down\.weight", "down"), (r"(.+)\.lora\.up\.weight", "up"),                 # diffusers UNet
    (r"(.+)\.lora_linear_layer\.down\.weight", "down"),                                       # diffusers text
    (r"(.+)\.lora_linear_layer\.up\.weight", "up"),
    (r"(.+_lora)\.down\.weight", "down"), (r"(.+_lora)\.up\.weight", "up"),                  # old processors
    (r"(.+)\.lora_down\.weight", "down"), (r"(.+)\.lora_up\.weight", "up"), (r"(.+)\.alpha", "alpha"),  # kohya
]
# The old attention-processor names -> module names.
OLD_MODULES = [
    (r"(.+)\.processor\.(to_[qkv])_lora", r"\1.\2"), (r"(.+)\.processor\.to_out_lora", r"\1.to_out.0"),
    (r"(.+\.self_attn)\.to_([qkv])_lora", r"\1.\2_proj"), (r"(.+\.self_attn)\.to_out_lora", r"\1.out_proj"),
]


@dataclass
class LoRAUpdate:
    part: str                      # "unet" or "text_encoder"
    module: str                    # our module name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down: torch.Tensor             # A: (r, in) or (r, in, k, k)
    up: torch.Tensor               # B: (out, r) or (out, r, 1, 1)
    alpha: float                   # the update is (alpha / r) B A
    key: str                       # the file's key of `down`, for messages


# ---- module names: ours <-> the file's ----------------------------------------------------------------
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Our Linear and Conv2d layers by name (an already adapted one by its own name, as its base)."""
    found = {}
    for name, m in model.named_modules():
        if any(name.startswith(n + ".") for n in found):
            continue                               # inside a LoRALayer: its base_layer / lora_A / lora_B
        if isinstance(m, lora.LoRALayer):
            found[name] = lora.innermost(m)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            found[name] = m
    return found


def model_parts(models) -> tuple[str, ...]:
    """The parts a LoRA may adapt: the UNet and the text encoder(s), SDXL's two."""
    return SDXL_PARTS if getattr(models, "is_sdxl", False) else PARTS


def theirs(part: str, ours: str) -> str:
    """The module's name in diffusers/transformers: the text encoder's under `text_model.encoder.`."""
    return TEXT_THEIRS + ours if part.startswith("text_encoder") and ours.startswith("layers.") else ours


def ours(part: str, theirs_name: str) -> str:
    if part.startswith("text_encoder"):
        return re.sub(r"^(?:text_model\.)?encoder\.(layers\..+)", r"\1", theirs_name)
    return theirs_name


def _split(key: str, kohya_names: dict[str, dict[str, str]], prefixes: dict[str, str]) -> tuple[str, str, str] | None:
    """key -> (part, our module name, role), or None when the key is not one we know. `prefixes`: kohya's
    prefix of each part (KOHYA_PREFIXES, or SDXL's)."""
    for part, prefix in prefixes.items():
        m = re.fullmatch(re.escape(prefix) + r"([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if m:
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(2)]
            module = kohya_names[part].get(m.group(1))
            return (part, module, role) if module else None
    if key.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
        part, _, rest = key.partition(".")
    else:   # no prefix: old UNet-only files, or a text-encoder file
        part, rest = ("text_encoder" if key.startswith("text_model.") else "unet"), key
    for pattern, role in KEY_FORMS:
        m = re.fullmatch(pattern, rest)
        if m:
            module = m.group(1)
            for old, new in OLD_MODULES:
                module = re.sub(f"^{old}$", new, module)
            return part, ours(part, module), role
    return None


# ---- the --lora flag ----------------------------------------------------------------------------------
# The strength range of ComfyUI's LoraLoader (strength_model, -100 to 100). Far beyond it the update swamps
# the weights: at -1e30 every activation overflows and every image is black.
MAX_SCALE = 100.0


def parse_lora_flags(values: list[str]) -> list[tuple[str, float]]:
    """--lora FILE or FILE:SCALE (sample.py and train_dreambooth.py) -> [(FILE, SCALE)], scale 1.0 by
    default; a FILE whose own name holds a colon is taken whole. FILE may be a folder or a repo id of the
    Hugging Face cache (`lora_weights_file`). Raises ValueError naming the flag: a scale that is not a
    finite number within +-MAX_SCALE, a FILE that is no LoRA file (a device such as /dev/null, a folder
    without one), named as what it is."""
    files = []
    for value in values:
        path, scale = value, 1.0
        if not Path(value).exists() and ":" in value and "/" not in value.rsplit(":", 1)[1]:   # not hf://
            path, text = value.rsplit(":", 1)
            try:
                scale = float(text)
            except ValueError:
                raise ValueError(f"--lora {value}: the scale {text!r} is not a number (FILE or FILE:SCALE)") from None
            if not abs(scale) <= MAX_SCALE:   # also NaN
                raise ValueError(f"--lora {value}: the scale {text} is not a finite number within "
                                 f"+-{MAX_SCALE:g} (ComfyUI's range; 1 applies the LoRA as trained)")
        files.append((str(lora_weights_file(path)), scale))
    return files


def lora_weights_file(value: str, *, flag: str = "--lora") -> Path:
    """The LoRA file that `value` names: a file; or a folder, a repo id of the Hugging Face cache included
    (common/hub_cache.py), holding pytorch_lora_weights.safetensors or one other .safetensors file (as
    diffusers' load_lora_weights guesses its weight_name, refusing where that guess would be arbitrary)."""
    path = resolve_model(value, flag=flag)
    if not path.is_dir():
        if not path.is_file():   # a device (/dev/null), a pipe: reading it would block or read nothing
            mode = path.stat().st_mode
            kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                    else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a regular file")
            raise ValueError(f"{flag} {value}: {path} is {kind}, not a LoRA file (a .safetensors file)")
        return path
    found = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors"
                   and not any(word in p.name for word in ("scheduler", "optimizer", "checkpoint")))
    for name in (DIFFUSERS_FILE, *found[:1] * (len(found) == 1), PICKLE_FILE):
        if (path / name).is_file():
            return path / name     # (a pickle is refused by name when read, with how to convert it)
    raise ValueError(f"{flag} {value}: {path} holds " + (f"several LoRA files ({', '.join(found)}): name one"
                                                         if found else "no LoRA .safetensors file"))


# ---- reading ------------------------------------------------------------------------------------------
def _adapter_metadata(path: Path) -> dict[str, dict]:
    """diffusers' "lora_adapter_metadata" ({"unet.lora_alpha": 8, ...}) as {"unet": {"lora_alpha": 8, ...}};
    an alpha that is not a finite number (JSON's NaN/Infinity) is refused, naming the file and the field."""
    raw = safetensors_metadata(path).get("lora_adapter_metadata")
    try:
        fields = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: lora_adapter_metadata is not a JSON object")
    metadata: dict[str, dict] = {}
    for k, v in fields.items():
        part, _, field = k.partition(".")
        alphas = (v or {}).values() if field == "alpha_pattern" and isinstance(v, dict) else [v]
        if field in ("lora_alpha", "alpha_pattern") and not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas):
            raise CheckpointError(f"{path}: lora_adapter_metadata {k} = {v!r}: an alpha must be a finite number")
        metadata.setdefault(part, {})[field] = v
    return metadata


def _adapter_alpha(metadata: dict, part: str, module: str, rank: int) -> float:
    """diffusers' safetensors metadata (peft LoraConfig fields under `unet.`/`text_encoder.`), else rank."""
    config = metadata.get(part, {})
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", theirs(part, module)):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def read_lora(path: str | Path, models, *, skip_unknown: bool = False) -> tuple[list[LoRAUpdate], list[str]]:
    """Every update of one LoRA file, mapped and shape-checked against `models` (nothing is applied).
    Returns (updates, skipped keys); raises CheckpointError naming the first bad key."""
    path = Path(path)
    tensors = read_safetensors(path)         # refuses pickles (.bin/.pt/.ckpt) by name
    source = str(path)
    check_finite(tensors, source=source)     # NaN weights or an infinite kohya alpha: refused by name
    metadata = _adapter_metadata(path)
    parts = model_parts(models)
    modules = {part: adaptable_modules(getattr(models, part)) for part in parts}
    # kohya's flat names: ours written the public way, "." as "_" (text: with or without `text_model_`)
    kohya_names = {part: {theirs(part, n).replace(".", "_"): n for n in modules[part]} for part in parts}
    for part in parts[1:]:
        kohya_names[part] |= {k.removeprefix("text_model_"): n for k, n in kohya_names[part].items()}
    if parts == SDXL_PARTS:   # sd-scripts' SDXL UNet: sgm's module names (single_file.unet_table, read backwards)
        from diffusion.checkpoints.single_file import UNET_PREFIX, unet_table
        table = unet_table(models.unet.config)
        kohya_names["unet"] |= {table.name(f"{n}.weight", reverse=True).removeprefix(UNET_PREFIX)
                                .removesuffix(".weight").replace(".", "_"): n for n in modules["unet"]}
    prefixes = SDXL_KOHYA_PREFIXES if parts == SDXL_PARTS else KOHYA_PREFIXES

    found: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key in sorted(tensors):
        split = _split(key, kohya_names, prefixes)
        if split is None or split[1] not in modules[split[0]]:
            unknown.append(key)
            continue
        part, module, role = split
        found.setdefault((part, module), {})[role] = (key, tensors[key])

    updates = []
    for (part, module), roles in found.items():
        if "down" not in roles or "up" not in roles:
            keys = ", ".join(k for k, _ in roles.values())
            raise CheckpointError(f"{source}: {keys}: the update of {part} {module} lacks its "
                                  f"{'down (A)' if 'down' not in roles else 'up (B)'} tensor")
        (key, down), (up_key, up) = roles["down"], roles["up"]
        base = modules[part][module]
        rank = down.shape[0]
        if isinstance(base, nn.Linear):
            want_down, want_up = (rank, base.in_features), (base.out_features, rank)
        else:
            want_down = (rank, base.in_channels, *base.kernel_size)
            want_up = (base.out_channels, rank, 1, 1)
        for k, t, want in ((key, down, want_down), (up_key, up, want_up)):
            if tuple(t.shape) != want:
                raise CheckpointError(
                    f"{source}: {k} has shape {tuple(t.shape)}, but {part} {module} "
                    f"({type(base).__name__} weight {tuple(base.weight.shape)}) needs {want}: this LoRA was made "
                    "for another architecture (an SD 2.x or SDXL LoRA on an SD v1 model?)")
        alpha = (float(roles["alpha"][1]) if "alpha" in roles
                 else _adapter_alpha(metadata, part, module, rank))
        updates.append(LoRAUpdate(part=part, module=module, down=down, up=up, alpha=alpha, key=key))
    if unknown and not skip_unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) match no module of this model: {listing(unknown, 10)} "
                              "(--lora_skip_unknown skips them)")
    if not updates:
        raise CheckpointError(f"{source}: no LoRA update in this file")
    return updates, unknown


def apply_lora(models, updates: list[LoRAUpdate], *, scale: float = 1.0) -> None:
    """Wrap each updated module in a LoRALayer holding the file's A and B (`lora.fuse` then folds them in)."""
    for u in updates:
        (layer,) = lora.inject(getattr(models, u.part), [u.module], rank=u.down.shape[0], alpha=u.alpha,
                               scale=scale)
        with torch.no_grad():
            layer.lora_A.weight.copy_(u.down.reshape(layer.lora_A.weight.shape))
            layer.lora_B.weight.copy_(u.up.reshape(layer.lora_B.weight.shape))


def load_lora_files(models, files: list[tuple[str, float]], *, fuse: bool = True,
                    skip_unknown: bool = False) -> tuple[set[str], list[str]]:
    """Read and check every (file, scale) first, then apply them all (fused into the weights unless
    `fuse` is False). Returns (the parts changed, "unet" and/or "text_encoder" (and SDXL's "text_encoder_2");
    the skipped keys, as "file: key")."""
    read = [(read_lora(path, models, skip_unknown=skip_unknown), scale, path) for path, scale in files]
    for (updates, _), scale, _ in read:
        apply_lora(models, updates, scale=scale)
    changed = {u.part for (updates, _), _, _ in read for u in updates}
    if fuse:
        for part in model_parts(models):
            lora.fuse(getattr(models, part))
        # finite files at a bounded scale can still overflow once fused (values near the dtype's limit)
        fused = {f"{u.part}.{u.module}.weight": getattr(models, u.part).get_submodule(u.module).weight
                 for (updates, _), _, _ in read for u in updates}
        check_finite(fused, source=" + ".join(f"{path}:{scale:g}" for path, scale in files) + " fused in")
    return changed, [f"{path}: {key}" for (_, skipped), _, path in read for key in skipped]


# ---- writing ------------------------------------------------------------------------------------------
def diffusers_lora_tensors(models, parts=PARTS) -> dict[str, torch.Tensor]:
    """The adapted modules' A and B under the keys diffusers' train_dreambooth_lora.py writes (alpha = rank)."""
    leaf = {"unet": ("lora.down", "lora.up"), "text_encoder": ("lora_linear_layer.down", "lora_linear_layer.up")}
    out = {}
    for part in parts:
        for name, layer in lora.lora_layers(getattr(models, part)).items():
            if layer.alpha != layer.rank:
                raise ValueError(f"{part} {name}: alpha {layer.alpha} != rank {layer.rank} has no place in "
                                 "diffusers' file keys (write the kohya format)")
            down, up = leaf["unet" if part == "unet" else "text_encoder"]   # SDXL's text_encoder_2: as the first
            out[f"{part}.{theirs(part, name)}.{down}.weight"] = layer.lora_A.weight.detach().contiguous()
            out[f"{part}.{theirs(part, name)}.{up}.weight"] = layer.lora_B.weight.detach().contiguous()
    return out


def kohya_lora_tensors(models, parts=PARTS) -> dict[str, torch.Tensor]:
    """The same updates in kohya's format (A1111, ComfyUI): flat names, lora_down/lora_up, and alpha."""
    out = {}
    for part in parts:
        for name, layer in lora.lora_layers(getattr(models, part)).items():
            flat = KOHYA_PREFIXES[part] + theirs(part, name).replace(".", "_")
            out[f"{flat}.lora_down.weight"] = layer.lora_A.weight.detach().contiguous()
            out[f"{flat}.lora_up.weight"] = layer.lora_B.weight.detach().contiguous()
            out[f"{flat}.alpha"] = torch.tensor(layer.alpha)
    return out


DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"          # the name load_lora_weights(folder) looks for
PICKLE_FILE = "pytorch_lora_weights.bin"                     # what older diffusers wrote
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def save_lora_files(models, folder: str | Path, *, parts=PARTS, kohya: bool = False) -> list[Path]:
    """folder/pytorch_lora_weights.safetensors in diffusers' format (and, with `kohya`, the kohya file);
    each written atomically. Returns the paths written."""
    folder = Path(folder)
    written = []
    for name, tensors in ((DIFFUSERS_FILE, diffusers_lora_tensors(models, parts)),
                          *([(KOHYA_FILE, kohya_lora_tensors(models, parts))] if kohya else [])):
        tensors = {k: v.float().cpu() for k, v in tensors.items()}
        write_safetensors(folder / name, tensors, {"format": "pt"})
        written.append(folder / name)
    return written
