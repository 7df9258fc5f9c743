"""The UNet and VAE configs of a checkpoint without loading its weights, so that scripts can check an
image size (or any flag that depends on the architecture) before spending time and memory on a load."""
from __future__ import annotations

from pathlib import Path

import torch

from diffusion.checkpoints import single_file
from diffusion.checkpoints.load import not_a_pipeline
from diffusion.models.unet import UNetConfig
from diffusion.models.vae import VAEConfig


def read_configs(ckpt: str | Path, config_dir: str | Path | None, *,
                 flags: tuple[str, str] = ("--ckpt", "--config")) -> tuple[UNetConfig, VAEConfig] | None:
    """(UNetConfig, VAEConfig) from the folder's (or `config_dir`'s) config.json files, or inferred from
    the tensor shapes in a .safetensors header. None for a .ckpt without `config_dir` (its shapes are
    only known once the file is read). Errors are ValueErrors naming the flag (`flags`: the names of
    the checkpoint and config-folder flags of the calling script)."""
    ckpt_flag, config_flag = flags
    folder = Path(ckpt) if Path(ckpt).is_dir() else (Path(config_dir) if config_dir is not None else None)
    if folder is not None:
        flag = ckpt_flag if folder == Path(ckpt) else config_flag
        for part in ("unet", "vae"):
            if not (folder / part / "config.json").is_file():
                raise ValueError(f"{flag} {folder}: no {part}/config.json{not_a_pipeline(folder)}")
        try:
            return UNetConfig.from_json(folder / "unet" / "config.json"), VAEConfig.from_json(folder / "vae" / "config.json")
        except ValueError as e:
            raise ValueError(f"{flag} {folder}: {e}") from None
    if Path(ckpt).suffix != ".safetensors":
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(ckpt), framework="pt") as f:  # the header only: names and shapes
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{ckpt_flag} {ckpt}: not a readable safetensors file ({e})") from None
    try:
        return configs_from_shapes(shapes, source=str(ckpt))
    except ValueError as e:
        raise ValueError(f"{ckpt_flag} {e}") from None


def configs_from_shapes(shapes: dict[str, tuple[int, ...]], *, source: str) -> tuple[UNetConfig, VAEConfig]:
    """(UNetConfig, VAEConfig) of an original single file from its tensor names and shapes alone
    (tensors on the meta device: no memory), by the loader's own shape inference."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet = {k: v for k, v in meta.items() if k.startswith(single_file.UNET_PREFIX)}
    vae = {k: v for k, v in meta.items() if k.startswith(single_file.VAE_PREFIX)}
    return single_file.infer_unet_config(unet, source=source), single_file.infer_vae_config(vae, source=source)
