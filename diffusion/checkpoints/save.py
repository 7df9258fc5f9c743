"""Writing Stable Diffusion v1 and 2.x back out: a diffusers folder and an original single file.

    save_diffusers_folder(models, "out/", trained={"unet"})     StableDiffusionPipeline.from_pretrained("out/") loads it
    save_single_file(models, "out/model.safetensors")           the CompVis/LDM layout, fp16, weights only

No mapping is written twice. Loading renames checkpoint keys onto ours by the key tables of
`diffusion/checkpoints/single_file.py` and `clip/weights.py` (common/state_dict.py's KeyTable); saving
reads the same tables backwards:

- when the output has the layout of the checkpoint that was loaded, every tensor goes back under the
  key it was read from (`under_source_names`), so the file keeps its exact key set (old VAE attention
  names, `text_model.` prefixes, `position_ids`, LDM's schedule buffers), and parts that were not
  trained are copied byte for byte;
- otherwise our keys are renamed by the table read backwards (`to_layout`), and the result is checked
  by reading it forwards again: the keys must come back exactly as ours, or the save stops naming the
  tensors that do not.

SD 2.x's text encoder goes into a single file in OpenCLIP's names with q, k and v fused back into
`in_proj_weight` (`clip/weights.py` `fuse_in_proj`): from a folder, the blocks SD 2 runs and no
text_projection, as diffusers' convert_diffusers_to_original_stable_diffusion.py writes it; from a single
file, under the file's own keys (its last block, text_projection and logit_scale kept as they came).

Trained weights are written in fp32 to the folder (the dtype they were trained in) and in fp16 to the
single file (half the size: about 2 GB for SD v1, with no optimizer state and no EMA copy).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch

from common.files import atomic_write, read_json
from common.state_dict import CheckpointError, KeyTable, check_keys, rename, write_safetensors
from clip.weights import (FOLDER_PREFIX, fuse_in_proj, single_file_text_table, source_table, split_in_proj,
                          text_encoder_state_dict, text_prefix, text_table)
from diffusion.checkpoints import single_file
from diffusion.models import unet as unet_module
from diffusion.models import vae as vae_module
from diffusion.checkpoints.ckpt import read_weights
from diffusion.checkpoints.load import FOLDER_FILES, read_single_file

PARTS = ("unet", "vae", "text_encoder")


# ---- the key tables, backwards ------------------------------------------------------------------------
def to_layout(ours: Mapping[str, torch.Tensor], table: KeyTable, *, what: str) -> dict[str, torch.Tensor]:
    """Our tensors under the names from which `table` loads them; checked by loading the names back."""
    unnamed = [k for k in ours if table.name(k, reverse=True) is None]
    names = rename({k: k for k in ours}, table, reverse=True)       # their name -> our name
    back = rename({k: k for k in names}, table)                     # must be our names again, exactly
    bad = sorted(unnamed + [our for our, theirs in back.items() if names[theirs] != our])
    if bad or set(back) != set(ours):
        raise CheckpointError(f"{what}: the key table does not write and read back "
                              f"{', '.join(bad[:10]) or 'some tensors'}")
    return {theirs: ours[our] for theirs, our in names.items()}


def under_source_names(ours: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], table: KeyTable, *,
                       what: str) -> dict[str, torch.Tensor]:
    """Our tensors under the source checkpoint's own keys (shapes as the source had them: LDM's 1x1-conv
    VAE attention). Source keys that the table drops (e.g. position_ids) keep their tensor."""
    kept = {k: v for k, v in source.items() if table.drops(k)}
    names = rename({k: k for k in source if k not in kept}, table)      # our name -> source name
    unknown = sorted(set(names) - set(ours))
    if unknown:
        raise CheckpointError(f"{what}: source tensors map to names the model does not have: "
                              f"{', '.join(names[k] for k in unknown[:10])}")
    if set(names) != set(ours):
        raise CheckpointError(f"{what}: not in the source checkpoint: {', '.join(sorted(set(ours) - set(names))[:10])}")
    return {**{theirs: ours[our].reshape(source[theirs].shape) for our, theirs in names.items()}, **kept}


def _vae_attention_as_conv(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `single_file.vae_attention_as_linear`: (C, C) -> (C, C, 1, 1)."""
    return {k: (v[:, :, None, None] if single_file.VAE_ATTENTION_LINEAR.fullmatch(k) and v.ndim == 2 else v)
            for k, v in tensors.items()}


def _contiguous(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies that own their memory (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            .contiguous().clone() for k, v in tensors.items()}


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, metadata)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---- diffusers folder -----------------------------------------------------------------------------------
def save_diffusers_folder(models, out: str | Path, *, trained: set[str], config_dir: str | Path | None = None) -> Path:
    """Write `models` as an SD v1 diffusers folder. `trained`: the parts whose weights changed
    ("unet", "text_encoder"); the others are written as they came (copied, from a folder source).

    From a folder source every config, the tokenizer and the scheduler are copied; a trained text
    encoder keeps its source file's key names. From a single file, the configs come from
    `config_dir` (as loading took them) or are written from our configs, the tokenizer from its
    vocabulary, and the text encoder gets SD v1's `text_model.*` names."""
    out, source = Path(out), Path(models.source)
    out.mkdir(parents=True, exist_ok=True)
    if models.layout == "diffusers":
        # model_index.json and the other components it names (tokenizer, scheduler, and a safety checker
        # or feature extractor if the folder has them), nothing else (not a previous run's checkpoints).
        shutil.copy2(source / "model_index.json", out / "model_index.json")
        index = read_json(source / "model_index.json")
        for name in index:
            if name not in PARTS and not name.startswith("_") and (source / name).is_dir():
                shutil.copytree(source / name, out / name, dirs_exist_ok=True)
        for part in PARTS:
            (out / part).mkdir(exist_ok=True)
            shutil.copy2(source / part / "config.json", out / part / "config.json")
            file = models.files[part]          # what was read: a variant's, an index of shards, a pickle
            if part not in trained and file.suffix == ".safetensors":
                shutil.copy2(file, out / part / FOLDER_FILES[part])
            elif part not in trained:          # the same tensors, under the same names, in one safetensors file
                _write_safetensors(out / part / FOLDER_FILES[part], _contiguous(read_weights(file)), {"format": "pt"})
            elif part == "unet":   # our UNet attributes carry diffusers' names: no renaming
                _write_safetensors(out / part / FOLDER_FILES[part], _contiguous(models.unet.state_dict()),
                                   {"format": "pt"})
            else:
                source_tensors = read_weights(file)
                tensors = under_source_names(models.text_encoder.state_dict(), source_tensors,
                                             text_table(text_prefix(source_tensors)), what=str(file))
                _write_safetensors(out / part / FOLDER_FILES[part], _contiguous(tensors), {"format": "pt"})
        return out

    # A single file: every part written from the models in memory (untrained parts from the file's tensors).
    unet_t, vae_t, text_t = single_file.split_single_file(read_single_file(source), use_ema=False, source=str(source))
    unet = (models.unet.state_dict() if "unet" in trained
            else rename(unet_t, single_file.unet_table(models.unet.config)))
    vae = single_file.vae_attention_as_linear(rename(vae_t, single_file.vae_table(models.vae.config)))
    text = (models.text_encoder.state_dict() if "text_encoder" in trained
            else text_encoder_state_dict(text_t, source=str(source),
                                         num_layers=models.text_encoder.config.num_hidden_layers))
    return _write_folder(models, out, {"unet": unet, "vae": vae, "text_encoder": text},
                         config_dir=Path(config_dir) if config_dir is not None else None)


def save_models_folder(models, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write models that exist only in memory (trained from scratch, as the tiny world's) as an SD v1
    diffusers folder: every part, config, the tokenizer's vocabulary and the scheduler config.
    dtype: cast floating tensors (torch.float16 halves the files; loading casts them back)."""
    parts = {"unet": models.unet.state_dict(), "vae": models.vae.state_dict(),
             "text_encoder": models.text_encoder.state_dict()}
    return _write_folder(models, Path(out), parts, config_dir=None, dtype=dtype)


def _write_folder(models, out: Path, parts: dict[str, Mapping[str, torch.Tensor]], *, config_dir: Path | None,
                  dtype: torch.dtype | None = None) -> Path:
    """parts: our state dicts -> out/<part>/ files (the text encoder under SD v1's `text_model.*`
    names); configs from `config_dir` where it has them, else written from ours."""
    out.mkdir(parents=True, exist_ok=True)
    parts = {**parts, "text_encoder": to_layout(parts["text_encoder"], text_table(FOLDER_PREFIX), what="text encoder")}
    for part, tensors in parts.items():
        (out / part).mkdir(exist_ok=True)
        _write_safetensors(out / part / FOLDER_FILES[part], _contiguous(tensors, dtype), {"format": "pt"})
    for part, config in (("unet", _unet_config(models.unet.config)), ("vae", _vae_config(models.vae.config)),
                         ("text_encoder", _text_config(models.text_encoder.config))):
        if config_dir is not None and (config_dir / part / "config.json").is_file():
            shutil.copy2(config_dir / part / "config.json", out / part / "config.json")
        else:
            _write_json(out / part / "config.json", config)
    if config_dir is not None and (config_dir / "tokenizer").is_dir():
        shutil.copytree(config_dir / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    else:
        _write_tokenizer(models.tokenizer, out / "tokenizer")
    _write_json(out / "scheduler" / "scheduler_config.json", {"_class_name": "PNDMScheduler", **models.scheduler_config,
                                                              "skip_prk_steps": True})
    _write_json(out / "model_index.json", MODEL_INDEX)
    return out


# SD v1.5's model_index.json without the safety checker and feature extractor (not part of training).
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
    "feature_extractor": [None, None], "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _unet_config(config) -> dict:
    return {"_class_name": "UNet2DConditionModel", **unet_module.SD_V1_ONLY_FIELDS, **asdict(config)}


def _vae_config(config) -> dict:
    return {"_class_name": "AutoencoderKL", **vae_module.SD_V1_ONLY_FIELDS, **asdict(config)}


def _text_config(config) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(config)}


def _write_tokenizer(tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json, the files of SD v1's tokenizer/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", tokenizer.vocab)
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    atomic_write(folder / "merges.txt", lambda tmp: Path(tmp).write_text(merges, encoding="utf-8"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.model_max_length,
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token})


# ---- original single file ---------------------------------------------------------------------------------
def save_single_file(models, path: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """The three models in one CompVis/LDM-layout safetensors file, floats in `dtype` (fp16: SD v1 in
    about 2 GB), weights only. From a single-file source, its own keys (and schedule buffers) are
    kept; its EMA copy (model_ema.*), stale once the UNet has been trained, is left out."""
    path = Path(path)
    unet, vae, text = models.unet.state_dict(), models.vae.state_dict(), models.text_encoder.state_dict()
    if models.layout == "single_file":
        source = read_single_file(Path(models.source))
        unet_s, vae_s, text_s = single_file.split_single_file(source, use_ema=False, source=models.source)
        tensors = {**under_source_names(unet, unet_s, single_file.unet_table(models.unet.config), what="UNet"),
                   **under_source_names(vae, vae_s, single_file.vae_table(models.vae.config), what="VAE"),
                   # SD 2.x's OpenCLIP tower: named by its q/k/v row blocks, then fused back into in_proj
                   **fuse_in_proj(under_source_names(text, split_in_proj(text_s), source_table(
                       text_s, num_layers=models.text_encoder.config.num_hidden_layers), what="text encoder")),
                   **{k: v for k, v in source.items() if k in single_file.IGNORED and not k.startswith(single_file.EMA_PREFIX)}}
    else:
        tensors = {**to_layout(unet, single_file.unet_table(models.unet.config), what="UNet"),
                   **to_layout(_vae_attention_as_conv(vae), single_file.vae_table(models.vae.config), what="VAE"),
                   **fuse_in_proj(to_layout(text, single_file_text_table(models.text_encoder.config),
                                            what="text encoder"))}
    _write_safetensors(path, _contiguous(tensors, dtype), {"format": "pt"})
    return path


def check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise CheckpointError unless `a` and `b` hold the same names and shapes."""
    check_keys({k: tuple(v.shape) for k, v in a.items()}, {k: tuple(v.shape) for k, v in b.items()}, source=source)
