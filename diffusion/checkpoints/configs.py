"""The UNet and VAE configs of a checkpoint without loading its weights, so that scripts can check an
image size (or any flag that depends on the architecture) before spending time and memory on a load."""
from __future__ import annotations

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
