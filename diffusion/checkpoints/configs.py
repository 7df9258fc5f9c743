"""The UNet and VAE configs of a checkpoint without loading its weights, so that scripts can check an
image size (or any flag that depends on the architecture) before spending time and memory on a load."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from diffusion.checkpoints import single_file
from diffusion.checkpoints.load import (check_text_width, folder_prediction_type, folder_text_widths, not_a_pipeline,
                                        single_file_prediction_type, single_file_text_widths)
from diffusion.models.unet import UNetConfig
from diffusion.models.vae import VAEConfig


def read_configs(ckpt: str | Path, config_dir: str | Path | None, *,
                 flags: tuple[str, str] = ("--ckpt", "--config"),
                 prediction_type: str | None = None) -> tuple[UNetConfig, VAEConfig] | None:
    """(UNetConfig, VAEConfig) from the folder's (or `config_dir`'s) config.json files, or inferred from
    the tensor shapes in a .safetensors header (for `prediction_type`, as loading infers them). None for a
    .ckpt without `config_dir` (its shapes are only known once the file is read). The text encoder's width
    is checked against the UNet's where a config or the header tells it, and `prediction_type` against a
    scheduler_config.json (diffusion/checkpoints/load.py). Errors are ValueErrors naming the flag (`flags`:
    the names of the checkpoint and config-folder flags of the calling script)."""
    ckpt_flag, config_flag = flags
    folder = Path(ckpt) if Path(ckpt).is_dir() else (Path(config_dir) if config_dir is not None else None)
    if folder is not None:
        flag = ckpt_flag if folder == Path(ckpt) else config_flag
        for part in ("unet", "vae"):
            if not (folder / part / "config.json").is_file():
                raise ValueError(f"{flag} {folder}: no {part}/config.json{not_a_pipeline(folder)}")
        try:
            configs = UNetConfig.from_json(folder / "unet" / "config.json"), VAEConfig.from_json(folder / "vae" / "config.json")
            folder_prediction_type(folder, prediction_type)
            widths = folder_text_widths(folder)
            if widths is not None:
                check_text_width(configs[0], widths[0], pooled_width=widths[1], source=str(folder))
        except ValueError as e:
            raise ValueError(f"{flag} {folder}: {e}") from None
        return configs
    if Path(ckpt).suffix != ".safetensors":
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(ckpt), framework="pt") as f:  # the header only: names and shapes
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{ckpt_flag} {ckpt}: not a readable safetensors file ({e})") from None
    try:
        configs = configs_from_shapes(shapes, source=str(ckpt),
                                      prediction_type=single_file_prediction_type(shapes, prediction_type, None))
        widths = single_file_text_widths(shapes)
        if widths is not None:
            check_text_width(configs[0], widths[0], pooled_width=widths[1], source=str(ckpt))
        return configs
    except ValueError as e:
        raise ValueError(f"{ckpt_flag} {e}") from None


def configs_from_shapes(shapes: dict[str, tuple[int, ...]], *, source: str,
                        prediction_type: str = "epsilon") -> tuple[UNetConfig, VAEConfig]:
    """(UNetConfig, VAEConfig) of an original single file from its tensor names and shapes alone
    (tensors on the meta device: no memory), by the loader's own shape inference."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet = {k: v for k, v in meta.items() if k.startswith(single_file.UNET_PREFIX)}
    vae = {k: v for k, v in meta.items() if k.startswith(single_file.VAE_PREFIX)}
    return (single_file.infer_unet_config(unet, source=source, prediction_type=prediction_type),
            single_file.infer_vae_config(vae, source=source, sdxl=single_file.family(shapes, source=source) == "sdxl"))



def read_scheduler_config(ckpt: str | Path, *, flag: str = "--ckpt") -> dict:
    """The noise schedule's config of a checkpoint, without loading it: a diffusers folder's
    scheduler/scheduler_config.json, or SD v1's for a single file (as `load_stable_diffusion` uses)."""
    from common.files import read_json
    from diffusion.checkpoints.load import SD_V1_SCHEDULER_CONFIG
    if not Path(ckpt).is_dir():
        return dict(SD_V1_SCHEDULER_CONFIG)
    try:
        config = read_json(Path(ckpt) / "scheduler" / "scheduler_config.json")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{flag} {ckpt}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {ckpt}: scheduler/scheduler_config.json is not a JSON object")
    return config


def check_sampling_steps(steps: int, scheduler_config: dict, *, flag: str) -> None:
    """A sampler takes 1 to num_train_timesteps steps (each step is a distinct training timestep);
    ValueError naming `flag` otherwise, before any model work."""
    from diffusion.schedule import ScheduleConfig
    total = ScheduleConfig.from_dict(scheduler_config).num_train_timesteps
    if not 1 <= steps <= total:
        raise ValueError(f"{flag} {steps}: must be from 1 to {total}, the model's num_train_timesteps (its noise "
                         f"schedule has {total} steps to visit)")


def parameter_counts(ckpt: str | Path, configs) -> dict[str, int]:
    """How many weights the checkpoint's UNet, VAE and text encoder hold, without reading a tensor: the UNet
    and VAE built from `configs` on the meta device; the text encoder from the folder's
    text_encoder/config.json (and SDXL's text_encoder_2/, its projection not counted), a single .safetensors
    file's header, or else SD v1's (CLIP ViT-L/14's text tower). Any layout of the weights (sharded, a variant, a pickle) counts alike."""
    from clip.text_model import CLIPTextConfig, CLIPTextModel
    from common.state_dict import empty_model, safetensors_header
    from diffusion.models.unet import UNet2DConditionModel
    from diffusion.models.vae import AutoencoderKL
    ckpt = Path(ckpt)
    count = lambda model: sum(p.numel() for p in model.parameters())
    with empty_model():
        counts = {"unet": count(UNet2DConditionModel(config=configs[0])), "vae": count(AutoencoderKL(config=configs[1]))}
        text_config = ckpt / "text_encoder" / "config.json"
        if ckpt.suffix == ".safetensors" and ckpt.is_file():
            header, _, _ = safetensors_header(ckpt)
            counts["text_encoder"] = sum(math.prod(e["shape"]) for k, e in header.items()
                                         if k.startswith((single_file.COND_PREFIX, single_file.CONDITIONER_PREFIX)))
        else:   # SD v1's and 2's one tower, SDXL's two
            configs_text = [CLIPTextConfig.from_json(f) for f in (text_config, ckpt / "text_encoder_2" / "config.json")
                            if f.is_file()] or [CLIPTextConfig()]
            counts["text_encoder"] = sum(count(CLIPTextModel(config)) for config in configs_text)
    return counts


def weights_bytes(ckpt: str | Path, configs, dtype_bytes: int) -> int:
    """About how many bytes the checkpoint's three models take in memory with weights of `dtype_bytes` each."""
    return dtype_bytes * sum(parameter_counts(ckpt, configs).values())
