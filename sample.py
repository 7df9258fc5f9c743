"""Text to image with Stable Diffusion v1, 2.x and SDXL, with the flags of CompVis's txt2img script
(`scripts/stable_txt2img.py` of the DreamBooth seed repository), so its users' habits carry over.

    python sample.py --ckpt path/to/stable-diffusion-v1-5 --prompt "a photo of an astronaut" \\
        --n_samples 2 --ddim_steps 50 --scale 7.5 --H 512 --W 512 --seed 42

    python sample.py          # no --ckpt: the embedded tiny model (embedded/world_sd), 64x64, in seconds

--ckpt takes a diffusers folder or one original single file (.safetensors or .ckpt), or a repo id read from
the Hugging Face cache (`runwayml/stable-diffusion-v1-5`, `org/name@revision`, `org/name/file.safetensors`;
nothing is downloaded: common/hub_cache.py). Each prompt
(--prompt, or every line of --from-file) is --n_iter batches (default 1) of --n_samples images, batch k
started from torch.randn((n_samples, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed + k)):
the same seed gives the images diffusers' StableDiffusionPipeline gives with generator=manual_seed(seed)
(each prompt starts from the seed afresh). DDIM by default (as CompVis); --sampler dpmpp_2m_karras
gives the same picture in about half the steps (docs/sampling.md); --plms is --sampler plms. Writes outdir/samples/NNNNN.png (numbering continues after the files already there;
nothing is ever overwritten) and one grid per prompt in outdir, and prints every path written; each sample's
prompt goes into outdir/samples/prompts.jsonl, which `python -m dreambooth.evaluate --prompts` reads.

Image to image (SDEdit, as CompVis's scripts/img2img.py and diffusers' StableDiffusionImg2ImgPipeline) and
inpainting (StableDiffusionInpaintPipeline; an inpainting checkpoint's 9-channel UNet or any 4-channel one):

    python sample.py --ckpt sd-v1-5 --init-img photo.png --strength 0.6 --prompt "an oil painting"
    python sample.py --ckpt sd-v1-5-inpainting --init-img photo.png --mask mask.png --prompt "a red bench"

The picture is --H x --W when given, else its own size rounded down to the VAE factor; the grids show it
as their first column.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from common.files import check_writable
from common.flags import UsageError, check_device, check_seed, exit_usage, read_lines
from common.hub_cache import resolve_model
from common.precision import SAMPLING_PRECISIONS
from common.run_config import finish_run_record, finite_float, read_config, start_run_record
from diffusion.checkpoints.lora_files import parse_lora_flags
from diffusion.samplers import SAMPLERS, SAMPLERS_WITH_ETA

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"  # the CompVis script's default
EMBEDDED_PROMPT = "a large yellow star on a blue background"     # a sentence the embedded model knows
PROG = "sample.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="diffusers folder or single .safetensors/.ckpt file, or a repo id of the Hugging "
                                  "Face cache: org/name[@revision][/file] (default: the embedded tiny model of "
                                  "world/'s coloured shapes, embedded/world_sd)")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit in the cache (default main)")
    p.add_argument("--variant", help="diffusers folder: read its <name>.VARIANT.safetensors files, e.g. fp16, "
                                     "as diffusers' from_pretrained(variant=...)")
    p.add_argument("--weights_name", help="the file to read in the --ckpt folder or repo, e.g. "
                                          "v1-5-pruned-emaonly.safetensors")
    p.add_argument("--prompt", default=None, help=f"the prompt to render (default: {DEFAULT_PROMPT!r}; with the "
                                                  f"embedded model {EMBEDDED_PROMPT!r})")
    p.add_argument("--negative_prompt", default=None,
                   help="replaces the empty unconditional prompt of classifier-free guidance")
    p.add_argument("--from-file", dest="from_file", default=None, help="read prompts from this file, one per line")
    p.add_argument("--outdir", default="outputs/txt2img-samples", help="where to write samples/ and the grids")
    p.add_argument("--n_samples", type=int, default=3, help="images per batch, sampled together")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt (CompVis's 'sample this often'); "
                                                         "batch k starts from --seed + k")
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (default ddim; "
                                                       "dpmpp_2m_karras needs about half the steps)")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps, for every sampler (as CompVis "
                                                              "used it for PLMS too)")
    p.add_argument("--ddim_eta", type=finite_float, default=None,
                   help="DDIM eta: 0.0 (default) deterministic, 1.0 as DDPM; only with --sampler ddim")
    p.add_argument("--plms", action="store_true", help="the same as --sampler plms (CompVis's flag)")
    p.add_argument("--scale", type=finite_float, default=7.5,
                   help="classifier-free guidance scale: eps = eps(x, uncond) + scale * (eps(x, cond) - "
                        "eps(x, uncond)); <= 1 samples without guidance")
    p.add_argument("--init-img", "--init_img", dest="init_img", default=None, metavar="FILE",
                   help="image to image (SDEdit): start from this picture, noised to --strength, instead of pure noise")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="with --init-img: how much of the schedule is run, in (0, 1]: the last int(steps * strength) "
                        "steps (default 0.8, as diffusers; CompVis's img2img uses 0.75; 1.0 with --mask); 1.0 keeps "
                        "only the picture's layout, small values keep it nearly as it is")
    p.add_argument("--mask", default=None, metavar="FILE",
                   help="with --init-img: inpainting; white repaints, black keeps (grayscale, binarised at 0.5, as "
                        "diffusers); resized to the picture's size")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's, "
                                                        "unet sample_size x VAE factor: 512 for SD v1)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: as --H)")
    p.add_argument("--seed", type=int, default=42, help="seed of the starting noise (and of DDIM's eta noise)")
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, default="fp32",
                   help="the weights' dtype: fp32 (CompVis's 'full'), or bf16/fp16 as diffusers' torch_dtype "
                        "(half the memory; bf16 is the fast one on a CPU); 'autocast': fp32 weights under "
                        "torch.autocast (bf16 on a CPU, fp16 on a GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--config", "--model_config", dest="config_dir", default=None,
                   help="folder with unet/, vae/, text_encoder/ config.json for a single-file --ckpt "
                        "(default: inferred from the tensor shapes); its tokenizer/, if any, is used too. "
                        "A FILE.toml instead is a run config: its keys are these flags' names")
    p.add_argument("--use_ema", action="store_true", help="single file: use its model_ema.* UNet weights")
    p.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                   help="single file: what its UNet predicts (a single file does not say; default: the --config "
                        "folder's scheduler, else epsilon for SD v1 and v_prediction, 768x768, for SD 2.x as diffusers "
                        "guesses; SD 2.x-base files need epsilon, which also makes their default size 512); a folder "
                        "says its own, and a different value is refused")
    p.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL: the micro-conditioning's original image size (default: the output size, as "
                        "StableDiffusionXLPipeline)")
    p.add_argument("--crops_coords_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                   help="SDXL: the micro-conditioning's crop corner (default 0 0)")
    p.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL: the micro-conditioning's target size (default: the output size)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="apply a LoRA file (diffusers or kohya format, .safetensors) at SCALE (default 1.0), "
                        "fused into the weights; repeat the flag to stack LoRAs")
    p.add_argument("--lora_unfused", action="store_true",
                   help="keep the LoRA updates beside the weights instead of fusing them (same images, slower)")
    p.add_argument("--lora_skip_unknown", action="store_true",
                   help="skip (and print) LoRA keys that match no module, instead of refusing the file")
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (diffusers' learned_embeds.safetensors, A1111's .pt or "
                        ".safetensors; a folder or repo id holding learned_embeds.*) whose word TOKEN (default: "
                        "the one a diffusers file stores, else the file's name) prompts can then use; repeatable "
                        "(clip/textual_inversion.py)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.from_file is not None:
        if args.prompt is not None:
            raise UsageError("give --prompt or --from-file, not both")
        prompts = read_lines(args.from_file, "--from-file")
        if not prompts:
            raise UsageError(f"--from-file {args.from_file}: the file holds no prompt (one prompt per line)")
        return prompts
    default = EMBEDDED_PROMPT if args.ckpt is None else DEFAULT_PROMPT
    prompt = default if args.prompt is None else args.prompt
    if not prompt.strip():
        raise UsageError("--prompt is empty")
    return [prompt]


def check_args(args: argparse.Namespace) -> None:
    """The flags and files that need no config (the image size is checked by `image_size`, the steps and
    the memory once the checkpoint's configs are read)."""
    if args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler}: must be one of {', '.join(SAMPLERS)}")
    if args.plms and args.sampler not in ("ddim", "plms"):   # ddim is the default, so it cannot tell
        raise UsageError(f"--plms cannot be used with --sampler {args.sampler}: --plms means --sampler plms")
    if args.plms:
        args.sampler = "plms"     # recorded so in run_config.toml
    if args.ddim_eta is not None and args.sampler not in SAMPLERS_WITH_ETA:
        why = "PLMS is deterministic (no eta)" if args.sampler == "plms" else f"{args.sampler} has no eta"
        raise UsageError(f"--ddim_eta cannot be used with --sampler {args.sampler}"
                         f"{' (--plms)' if args.plms else ''}: {why}")
    if args.ddim_eta is not None and not 0 <= args.ddim_eta <= 1:
        raise UsageError(f"--ddim_eta {args.ddim_eta}: must be from 0 (deterministic DDIM) to 1 (DDPM); beyond 1, "
                         "DDIM eq. 12 takes the square root of a negative number")
    for flag in ("n_samples", "n_iter", "ddim_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    check_seed(args.seed, count=args.n_iter)          # batch k starts from --seed + k
    args.ckpt = str(resolve_model(args.ckpt, flag="--ckpt", revision=args.revision, weights_name=args.weights_name))
    if args.config_dir is not None:
        args.config_dir = str(resolve_model(args.config_dir, flag="--config"))
    if args.config_dir is not None and not Path(args.config_dir).is_dir():
        raise UsageError(f"--config {args.config_dir}: not a folder (nor a run config FILE.toml)")
    if args.use_ema and Path(args.ckpt).is_dir():
        raise UsageError("--use_ema applies to a single-file --ckpt; a diffusers folder holds one UNet")
    if args.variant is not None and not Path(args.ckpt).is_dir():
        raise UsageError(f"--variant {args.variant}: applies to a diffusers folder; --ckpt {args.ckpt} is a single file")
    parse_lora_flags(args.lora or [])     # raises ValueError naming --lora
    check_writable(args.outdir, "--outdir")   # a file, under a file, read-only: named now (nothing is created)
    check_image_flags(args)


def check_image_flags(args: argparse.Namespace) -> None:
    """--init-img, --strength and --mask, and the pictures read (header first: the pixel limit), before any
    model loads; the pictures are kept on args for the run."""
    from common.images import MAX_IMAGE_PIXELS, ImageError, load_image
    if args.mask is not None and args.init_img is None:
        raise UsageError(f"--mask {args.mask} needs --init-img: the mask says which part of that picture is repainted")
    if args.strength is not None and args.init_img is None:
        raise UsageError(f"--strength {args.strength} applies to image to image and inpainting: give --init-img")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError(f"--strength {args.strength}: must be in (0, 1] (1 starts from pure noise, small values "
                         "stay near the picture)")
    args.init_picture = args.mask_picture = None
    if args.init_img is None:
        return
    if args.strength is None:     # recorded in run_config.toml
        from diffusion.init_image import default_strength
        args.strength = default_strength(inpainting=args.mask is not None)
    if int(args.ddim_steps * args.strength) < 1:
        raise UsageError(f"--strength {args.strength} with --ddim_steps {args.ddim_steps}: int({args.ddim_steps} * "
                         f"{args.strength}) = 0 steps to run; raise --strength or --ddim_steps")
    for flag, path, attr in (("--init-img", args.init_img, "init_picture"), ("--mask", args.mask, "mask_picture")):
        if path is not None:
            try:
                setattr(args, attr, load_image(path, max_pixels=MAX_IMAGE_PIXELS))
            except ImageError as e:
                raise UsageError(f"{flag} {e}") from None


def inpainting_unet(args: argparse.Namespace, unet_config, vae_config) -> None:
    """A 9-channel (inpainting) UNet samples only with --mask; said before any model loads when the configs
    are known from the files."""
    if unet_config.in_channels != vae_config.latent_channels and args.mask is None:
        raise UsageError(f"--ckpt {args.ckpt}: an inpainting UNet ({unet_config.in_channels} input channels: latents, "
                         "mask, masked picture) needs --init-img and --mask")


def check_memory_of_run(args: argparse.Namespace, configs, *, device, dtype_bytes: int) -> None:
    """The memory of one batch (the weights, the sampling's peak, and a prompt's images kept for its grid)
    against what `device` has, before the weights are loaded; the message says which flag to lower."""
    from common.memory import available_memory, check_memory, gb
    from diffusion.checkpoints.configs import weights_bytes
    from diffusion.pipeline import sampling_memory
    n, n_iter = args.n_samples, args.n_iter
    weights = weights_bytes(args.ckpt, configs, dtype_bytes)
    one = sampling_memory(*configs, images=1, height=args.H, width=args.W, dtype_bytes=dtype_bytes,
                          guidance=args.scale > 1)
    kept = 2 * args.H * args.W * 3           # an image and its place in the grid (uint8 RGB), kept to the grid
    need = lambda n, n_iter: weights + n * one + n_iter * n * kept
    have = available_memory(device)
    if have is None or need(n, n_iter) <= have:
        return
    if need(1, 1) > have:
        advice = f"one {args.H}x{args.W} image needs about {gb(one)}: lower --H/--W"
    elif need(n, 1) > have:
        fit = (have - weights) // (one + kept)
        advice = (f"about {gb(one)} an image: {fit} fit at once; lower --n_samples to {fit} or less and sample "
                  "more batches with --n_iter")
    else:
        fit = (have - weights - n * one) // (n * kept)
        advice = (f"a prompt's images are kept for its grid until its last batch: lower --n_iter to {fit} or less "
                  "and run more commands (--seed + k starts batch k)")
    check_memory(need(n, n_iter), device=device, what=f"--n_samples {n} --n_iter {n_iter} of {args.H}x{args.W} "
                 "images", advice=advice)


MICRO_FLAGS = ("original_size", "crops_coords_top_left", "target_size")


def check_micro_conditioning(args: argparse.Namespace, unet_config) -> None:
    """SDXL's micro-conditioning flags need a UNet that reads them (addition_embed_type text_time); SDXL has no
    image to image or inpainting here yet."""
    given = [f"--{name}" for name in MICRO_FLAGS if getattr(args, name) is not None]
    if given and unet_config.addition_embed_type is None:
        raise UsageError(f"{', '.join(given)}: SDXL's micro-conditioning; --ckpt {args.ckpt} is an SD v1 or 2.x "
                         "model, whose UNet has none")
    if unet_config.addition_embed_type is not None and args.init_img is not None:
        raise UsageError(f"--init-img {args.init_img}: image to image and inpainting are built for SD v1 and 2.x; "
                         f"--ckpt {args.ckpt} is SDXL")
    for name in MICRO_FLAGS:
        value = getattr(args, name)
        if value is not None and (min(value) < 0 or (name != "crops_coords_top_left" and min(value) < 1)):
            raise UsageError(f"--{name} {' '.join(map(str, value))}: must be "
                             f"{'>= 0' if name == 'crops_coords_top_left' else 'positive'}")


def image_size(args: argparse.Namespace, configs) -> None:
    """--H/--W against the UNet and VAE configs: multiples of f * 2^(UNet levels - 1). Unset, they
    become the model's own size, unet sample_size x VAE factor (as diffusers' pipeline does), or with
    --init-img the picture's own, rounded down to the VAE factor (as diffusers' VaeImageProcessor)."""
    from diffusion.init_image import default_size
    from diffusion.pipeline import check_size
    unet_config, vae_config = configs
    inpainting_unet(args, unet_config, vae_config)
    given = (args.H, args.W)
    if getattr(args, "init_picture", None) is not None:
        args.H, args.W = default_size(args.init_picture, args.H, args.W, factor=vae_config.spatial_factor)
    args.H = unet_config.sample_size * vae_config.spatial_factor if args.H is None else args.H
    args.W = unet_config.sample_size * vae_config.spatial_factor if args.W is None else args.W
    try:
        check_size(args.H, args.W, *configs, names=("--H", "--W"))
    except ValueError as e:
        if given != (args.H, args.W):     # a size taken from the picture
            picture = args.init_picture
            raise UsageError(f"--init-img {args.init_img}: its size {picture.width}x{picture.height} gives "
                             f"{args.W}x{args.H}, which the model cannot take ({e}); give --H and --W") from None
        raise UsageError(str(e)) from None
    mask = getattr(args, "mask_picture", None)
    if mask is not None and mask.size != args.init_picture.size:
        print(f"--mask {args.mask}: {mask.width}x{mask.height}, the picture {args.init_picture.width}x"
              f"{args.init_picture.height}: both are resized to {args.W}x{args.H} (as diffusers)", file=sys.stderr)


def next_index(folder: Path, pattern: str) -> int:
    """1 + the largest number among the names in `folder` that match `pattern` (group 1), else 0."""
    numbers = [int(m.group(1)) for f in folder.iterdir() if (m := re.fullmatch(pattern, f.name))]
    return max(numbers, default=-1) + 1


def save_new(image, folder: Path, pattern: str, name_of) -> Path:
    """Save a PIL image under the next free number; exclusive creation, so nothing is overwritten."""
    index = next_index(folder, pattern)
    while True:
        path = folder / name_of(index)
        try:
            with open(path, "xb") as fh:
                image.save(fh, format="PNG")
            return path
        except FileExistsError:  # another run took this number meanwhile
            index += 1


def input_files(args: argparse.Namespace) -> dict:
    """The pictures a run started from, for run_info.json: path and sha256 (run_config.toml has the paths)."""
    from common.files import file_sha256
    return {name: {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
            for name, path in (("init_image", args.init_img), ("mask", args.mask)) if path is not None}


def grid_row(batch: list, args: argparse.Namespace) -> list:
    """A batch's row of the grid: with --init-img the picture first (at the samples' size, with the mask's
    repainted region shown grey when inpainting, as the UNet saw it), then the samples."""
    if args.init_picture is None:
        return batch
    from PIL import Image
    picture = args.init_picture.resize(batch[0].size, resample=Image.Resampling.LANCZOS)
    if args.mask_picture is not None:
        from diffusion.init_image import mask_to_pixels
        mask = mask_to_pixels(args.mask_picture, picture.height, picture.width)[0, 0].numpy() >= 0.5
        grey = Image.new("RGB", picture.size, (128, 128, 128))
        picture = Image.composite(grey, picture, Image.fromarray(mask.astype("uint8") * 255))
    return [picture, *batch]


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`--config` is either a run config FILE.toml (its keys are the flag names; flags on the command
    line win) or, as in CompVis's txt2img, the model's config folder."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if known.config is None or not known.config.endswith(".toml"):
        return parser.parse_args(argv)
    parser.set_defaults(**read_config(known.config, parser))
    return parser.parse_args(rest)


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the script; returns the paths written (samples then grid, prompt by prompt). A bad flag or file
    is one line on stderr and exit status 2, before anything is written (`common.flags`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        prompts = read_prompts(args)
        if args.ckpt is None:   # after read_prompts: the default prompt depends on it
            from embedded import WORLD_SD
            args.ckpt = str(WORLD_SD)
            print(f"no --ckpt: sampling the embedded tiny model {WORLD_SD} (coloured shapes only)", file=sys.stderr)
        check_args(args)
        from clip.textual_inversion import parse_embedding_flags, read_embeddings
        try:   # every file read and checked before the model loads
            embeddings = read_embeddings(parse_embedding_flags(args.embedding or []))
        except ValueError as e:
            raise UsageError(f"--embedding {e}") from None
        # imports torch: after the cheap checks
        from diffusion.checkpoints.configs import check_sampling_steps, read_configs, read_scheduler_config
        configs = read_configs(args.ckpt, args.config_dir, prediction_type=args.prediction_type)
        check_sampling_steps(args.ddim_steps, read_scheduler_config(args.ckpt), flag="--ddim_steps")
        if configs is not None:
            image_size(args, configs)
            check_micro_conditioning(args, configs[0])
        device = check_device(args.device)           # cpu or cuda[:N] that exists here
    except ValueError as e:   # UsageError, and read_configs' errors, which name the flag
        exit_usage(PROG, e)

    from common.precision import DTYPES, check_device_runs, sampling_precision, slow_precision_warning
    from common.state_dict import CheckpointError
    from diffusion.speed import arrange_for_speed
    from diffusion.pipeline import NonFiniteError, generate, make_grid
    from diffusion.checkpoints.load import load_stable_diffusion
    from dreambooth.prompts import record_prompt

    if args.precision == "full":
        args.precision = "fp32"          # CompVis's spelling; recorded as the dtype name
    weights_dtype, autocast = sampling_precision(args.precision, device)
    compute_dtype = weights_dtype if autocast == "fp32" else DTYPES[autocast]
    try:
        check_device_runs(compute_dtype, device, flag="--precision")
        if configs is not None:
            check_memory_of_run(args, configs, device=device, dtype_bytes=weights_dtype.itemsize)
    except ValueError as e:
        exit_usage(PROG, e)
    if warning := slow_precision_warning(compute_dtype, device, flag="--precision"):
        print(warning, file=sys.stderr)
    try:
        models = load_stable_diffusion(args.ckpt, config_dir=args.config_dir, use_ema=args.use_ema,
                                       dtype=weights_dtype, variant=args.variant, prediction_type=args.prediction_type)
    except (CheckpointError, OSError, ValueError) as e:
        exit_usage(PROG, f"--ckpt {args.ckpt}: {e}")
    if configs is None:  # a .ckpt: its architecture is known now, before any sampling
        try:
            configs = (models.unet.config, models.vae.config)
            image_size(args, configs)
            check_memory_of_run(args, configs, device=device, dtype_bytes=weights_dtype.itemsize)
            check_micro_conditioning(args, models.unet.config)
        except UsageError as e:
            exit_usage(PROG, e)
    if args.lora:   # every file read and checked against the model first, then applied (and fused)
        from diffusion.checkpoints.lora_files import load_lora_files
        try:
            _, skipped = load_lora_files(models, parse_lora_flags(args.lora), fuse=not args.lora_unfused,
                                         skip_unknown=args.lora_skip_unknown)
        except (CheckpointError, OSError) as e:
            exit_usage(PROG, f"--lora {e}")
        for key in skipped:
            print(f"--lora_skip_unknown: skipped {key}", file=sys.stderr)
    if embeddings:   # their words taught to the tokenizer, their vectors appended to the token embedding
        from clip.textual_inversion import add_embeddings
        try:
            add_embeddings(models.text_encoder, models.tokenizer, embeddings)
        except ValueError as e:
            exit_usage(PROG, f"--embedding {e}")
    for module in (models.unet, models.vae, *models.text_encoders):
        module.to(device).eval()
    compute = autocast if autocast != "fp32" else args.precision   # the dtype the convolutions run in
    layouts = arrange_for_speed(models, device=device, precision=compute)         # diffusion/speed.py

    outdir = Path(args.outdir)
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    # run_config.toml (every flag, defaults included) and run_info.json: `--config run_config.toml` repeats it
    info = start_run_record(outdir, args, parser, device=str(device), dtype=args.precision, world_size=1, argv=argv,
                            memory_format=layouts, **input_files(args))
    written: list[Path] = []
    try:
        for prompt in prompts:
            images = []
            for k in range(args.n_iter):     # batch k: what `--seed SEED+k --n_iter 1` gives
                batch = generate(models, [prompt], negative_prompt=args.negative_prompt,
                                 num_images_per_prompt=args.n_samples, steps=args.ddim_steps,
                                 eta=args.ddim_eta, guidance_scale=args.scale, height=args.H, width=args.W,
                                 seed=args.seed + k, sampler=args.sampler, autocast=autocast,
                                 progress=True, output="pil", init_image=args.init_picture,
                                 mask_image=args.mask_picture, strength=args.strength,
                                 **{name: getattr(args, name) for name in MICRO_FLAGS})
                for image in batch:
                    written.append(save_new(image, samples, r"(\d+)\.\w+", lambda i: f"{i:05d}.png"))
                    record_prompt(samples, written[-1].name, prompt)    # samples/prompts.jsonl, for CLIP-T
                    print(written[-1], flush=True)
                images += grid_row(batch, args)
            slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:30] or "prompt"
            columns = args.n_samples + (args.init_picture is not None)
            written.append(save_new(make_grid(images, columns=columns), outdir, r".*-grid-(\d+)\.png",
                                    lambda i: f"{slug}-grid-{i:04d}.png"))   # a row per batch, as CompVis
            print(written[-1], flush=True)
    except BaseException as e:   # the record says how the run ended (Ctrl-C, an error), with what it wrote
        status = "stopped by Ctrl-C" if isinstance(e, KeyboardInterrupt) else f"failed: {e}"
        finish_run_record(outdir, info, status=status, images_written=len(written))
        if isinstance(e, NonFiniteError):     # broken weights: one line, no traceback, nothing more written
            exit_usage(PROG, e, status=1)
        raise
    finish_run_record(outdir, info, images_written=len(written))
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
