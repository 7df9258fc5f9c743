"""DreamBooth's data: the instance photos, the class images the base model generates, and the crops.

Everything here runs before a model is loaded (except `generate_class_images`), so bad input is
reported first: a folder without images, a file that is not an image, an unwritable class folder.

Images are prepared as diffusers' DreamBooth example prepares them: EXIF orientation applied, RGB,
the shorter side resized to `resolution` (bilinear, PIL), then a `resolution` square cropped from the
centre (--center_crop) or at a random offset, and scaled to [-1, 1].
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write
from common.images import MAX_IMAGE_PIXELS, ImageError, load_image as read_image, resized_size
from dreambooth.prompts import PROMPTS_FILE

CLASS_IMAGE_NAME = re.compile(r"class-(\d+)\.png")   # generated class image of index N: class-0000N.png


class DataError(ValueError):
    """A data folder or file that cannot be used; the message names the flag and the file."""


def image_files(folder: str | Path, *, flag: str) -> list[Path]:
    """Every file of `folder` (sorted, hidden files and the prompts.jsonl sample.py keeps beside its samples
    skipped), each decoded in full here, before any model loads: a file that is not an image, a truncated
    one, one over MAX_IMAGE_PIXELS or in a format that needs an external program (EPS) is a DataError
    naming the flag and the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != PROMPTS_FILE)
    for file in files:
        decode_image(file, flag=flag).close()
    return files


def decode_image(file: Path, *, flag: str | None):
    """The image as an RGB PIL image (EXIF orientation applied); a DataError names the flag and the file."""
    try:
        return read_image(file, max_pixels=MAX_IMAGE_PIXELS)
    except ImageError as e:
        where = f"{flag} {file.parent}: {file.name}" if flag else str(file)
        raise DataError(f"{where} is not a readable image ({e})") from None


def image_size(file: Path, *, flag: str | None = None) -> tuple[int, int]:
    """(height, width) of the image as decoded (EXIF orientation applied), before any resizing: SDXL's
    "original size" conditioning of its crops, as train_dreambooth_lora_sdxl.py's dataset records it."""
    with decode_image(file, flag=flag) as im:
        return im.height, im.width


def load_image(file: Path, resolution: int, *, flag: str | None = None) -> torch.Tensor:
    """(3, H, W) uint8 with the shorter side equal to `resolution` (EXIF orientation applied)."""
    from PIL import Image
    with decode_image(file, flag=flag) as im:
        im = im.resize(resized_size(*im.size, resolution), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)       # (3, H, W)


def crop(image: torch.Tensor, resolution: int, *, center: bool,
         generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """A `resolution` square of a (3, H, W) uint8 image -> ((3, r, r) float in [-1, 1], its (top, left)).

    centre: torchvision's CenterCrop offsets (rounded half-differences); else a uniform random
    offset drawn from `generator` (drawn in both cases, so the random stream does not depend on it)."""
    _, h, w = image.shape
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    if center:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    pixels = image[:, top:top + resolution, left:left + resolution].float() / 255.0
    return pixels * 2.0 - 1.0, (top, left)                                       # [0, 1] -> [-1, 1]


def example_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one training example: its crop, latent sample, noise and timestep depend only
    on (seed, epoch, its position in the epoch), so one process and N processes draw the same numbers,
    and a resumed run draws what the uninterrupted run would have."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def add_model_flags(add_argument) -> None:
    """The base model's flags of both trainers (train_dreambooth.py, train_textual_inversion.py), which
    `resolve_base` and `check_model_size` read."""
    a = add_argument
    a("--pretrained_model_name_or_path", help="SD v1, 2.x or SDXL diffusers folder or single .safetensors/.ckpt "
      "file, or a repo id of the Hugging Face cache: org/name[@revision][/file] (required)")
    a("--revision", help="with a repo id: the branch, tag or commit of the cached model (default main)")
    a("--variant", help="read the model's <name>.VARIANT.safetensors files, e.g. fp16, as diffusers' from_pretrained")
    a("--pretrained_config_dir", help="for a single file: folder with unet/, vae/, text_encoder/ config.json (and "
                                      "tokenizer/), as sample.py --config (default: inferred from the shapes)")
    a("--prediction_type", choices=("epsilon", "v_prediction"), help="for a single file: what its UNet predicts, "
      "as sample.py --prediction_type (default: epsilon for SD v1, v_prediction for SD 2.x); the training target")


def resolve_base(args) -> tuple[str, str | None]:
    """--pretrained_model_name_or_path and --pretrained_config_dir as local paths: a repo id (with --revision)
    read from the Hugging Face cache, a local path as it is (common/hub_cache.py)."""
    from common.hub_cache import resolve_model
    model = resolve_model(args.pretrained_model_name_or_path, flag="--pretrained_model_name_or_path",
                          revision=args.revision)
    config = args.pretrained_config_dir and resolve_model(args.pretrained_config_dir, flag="--pretrained_config_dir")
    if args.variant is not None and not model.is_dir():
        raise DataError(f"--variant {args.variant}: applies to a diffusers folder; --pretrained_model_name_or_path "
                        f"{args.pretrained_model_name_or_path} is a single file")
    return str(model), config and str(config)


def check_model_size(args, instance_files: list[Path] = ()):
    """--resolution, --rank and the memory that the run's sizes need (dreambooth/memory.py), against the
    model's configs read without loading weights (as sample.py does). A .ckpt's configs are known only once
    it is read: its --resolution and --rank are checked then (steps.load_models). An unset --resolution
    (None) becomes the family's default: SDXL's 1024 (train_dreambooth_lora_sdxl.py's), else 512.
    Returns the configs (None for a .ckpt)."""
    from common.state_dict import empty_model
    from diffusion import lora
    from diffusion.checkpoints.configs import read_configs
    from diffusion.models.unet import UNet2DConditionModel
    from diffusion.pipeline import check_size
    from dreambooth.memory import check_run_memory
    try:
        configs = read_configs(args.pretrained_model_name_or_path, args.pretrained_config_dir,
                               flags=("--pretrained_model_name_or_path", "--pretrained_config_dir"),
                               prediction_type=args.prediction_type)
    except ValueError as e:
        raise DataError(str(e)) from None
    sdxl = configs is not None and configs[0].addition_embed_type is not None
    if getattr(args, "resolution", 0) is None:
        args.resolution = 1024 if sdxl else 512
    if configs is None:   # a .ckpt, whose shapes are checked once it is loaded
        return None
    if sdxl and not hasattr(args, "rank"):   # train_textual_inversion.py
        raise DataError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: an SDXL model; "
                        "train_textual_inversion.py trains SD v1 and 2.x only (SDXL samples with sample.py)")
    if sdxl and args.rank is None:
        from dreambooth.memory import sdxl_full_fine_tuning_refusal
        raise DataError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: "
                        + sdxl_full_fine_tuning_refusal(configs[0]))
    check_size(args.resolution, args.resolution, *configs, names=("--resolution", "--resolution"))
    if getattr(args, "rank", None) is not None:   # train_textual_inversion.py has no --rank
        with empty_model():                       # the UNet's layer widths, no memory
            unet = UNet2DConditionModel(config=configs[0])
        lora.check_rank(unet, lora.UNET_TARGETS, args.rank, flag="--rank")
    check_run_memory(args, configs, list(instance_files))
    return configs


# ---- class images -----------------------------------------------------------------------------------------
def missing_class_indices(folder: Path, num_class_images: int) -> list[int]:
    """The indices to generate so that `folder` holds `num_class_images` images: the lowest indices
    whose class-NNNNN.png is absent (images of other names, e.g. real photos, count as well)."""
    present = image_files(folder, flag="--class_data_dir") if folder.is_dir() else []
    taken = {int(m.group(1)) for p in present if (m := CLASS_IMAGE_NAME.fullmatch(p.name))}
    need, out, index = num_class_images - len(present), [], 0
    while len(out) < need:
        if index not in taken:
            out.append(index)
        index += 1
    return out


def class_image_seed(seed: int, index: int) -> int:
    """The seed of class image `index`: the same index always starts from the same noise."""
    return seed + index


@torch.no_grad()
def generate_class_images(models, folder: Path, indices: list[int], *, prompt: str, resolution: int, seed: int,
                          batch_size: int, steps: int, guidance_scale: float,
                          share: tuple[int, int] = (0, 1), progress: bool = True, sampler: str = "ddim") -> list[Path]:
    """Generate class image i for every i in `indices` with the base model (in its weights' dtype, as
    diffusers' class-image pipeline with torch_dtype) and the project's sampler
    `sampler` (a name in `diffusion.samplers.SAMPLERS`; batched classifier-free guidance), each from its
    own seed `class_image_seed(seed, i)`; a stochastic sampler's per-step noise comes from the seed of
    the group's first index, so a group is always computed the same.

    Images are made in fixed groups of `batch_size` consecutive indices (index i belongs to group
    i // batch_size, always computed whole), so a rerun that fills a gap computes every image in the
    same batch as the first run did, and writes only the missing files. `share` = (rank, world size):
    with several processes, each makes every world-size-th group. SDXL: each missing image alone, by
    `diffusion.pipeline.generate` (its added conditioning, and zeros for the empty negative prompt, as
    StableDiffusionXLPipeline makes them), from its own seed for its latents and a stochastic sampler alike."""
    from tqdm import tqdm

    from diffusion.pipeline import decode_to_uint8, denoise, encode_prompts, generate, initial_latents, to_pil
    from diffusion.samplers import make_sampler
    folder.mkdir(parents=True, exist_ok=True)
    device = next(models.unet.parameters()).device
    unet_config, vae_config = models.unet.config, models.vae.config
    wanted = set(indices)
    rank, world_size = share
    groups = [g for g in sorted({i // batch_size for i in indices}) if g % world_size == rank]
    written = []
    bar = tqdm(total=sum(1 for i in indices if i // batch_size in groups), desc="class images", unit="image",
               disable=not progress)
    for g in groups:
        group = list(range(g * batch_size, (g + 1) * batch_size))
        if models.is_sdxl:   # one image per seed, as StableDiffusionXLPipeline(prompt, generator=seed) draws it
            for i in (i for i in group if i in wanted):
                image = generate(models, prompt, seed=class_image_seed(seed, i), steps=steps, height=resolution,
                                 width=resolution, guidance_scale=guidance_scale, sampler=sampler, progress=False,
                                 output="pil")[0]
                written.append(_save_class_image(folder, i, image))
                bar.update(1)
            continue
        uncond, cond = encode_prompts(models.text_encoder, models.tokenizer, ["", prompt],
                                      device).chunk(2)   # (1, 77, D) each
        latents = torch.cat([initial_latents(1, channels=unet_config.in_channels, height=resolution,
                                             width=resolution, factor=vae_config.spatial_factor,
                                             generator=torch.Generator("cpu").manual_seed(class_image_seed(seed, i)),
                                             device=device) for i in group])             # (n, C, h, w)
        n = len(group)
        latents = denoise(models.unet, latents, cond.expand(n, -1, -1), uncond.expand(n, -1, -1),
                          sampler=make_sampler(models.scheduler_config, sampler), steps=steps,
                          guidance_scale=guidance_scale, progress=False,
                          # a stochastic sampler (euler_a) draws from the group's own generator
                          generator=torch.Generator("cpu").manual_seed(class_image_seed(seed, group[0])))
        images = to_pil(decode_to_uint8(models.vae, latents))
        for i, image in zip(group, images):
            if i in wanted:
                written.append(_save_class_image(folder, i, image))
                bar.update(1)
    bar.close()
    return written


def _save_class_image(folder: Path, index: int, image) -> Path:
    path = folder / f"class-{index:05d}.png"
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))   # never a torn PNG
    return path
