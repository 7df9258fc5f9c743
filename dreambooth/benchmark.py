"""`python -m dreambooth.evaluate benchmark`: one subject's row of the DreamBooth paper's Table 1, by its
protocol (sec. 4.1): the dataset's 25 prompts for the subject's kind (dreambooth/benchmark_prompts.json,
objects or live subjects), 4 images each from the fine-tuned model, then DINO, CLIP-I and CLIP-T against
the subject's real photos; with --class_images N, also N images of the plain class ("a dog") and PRES.

    python -m dreambooth.evaluate benchmark --model runs/sks-dog --subject data/dog --class_noun dog --live \\
        --dino models/dino-vits16 --clip models/clip-vit-large-patch14

The images are sample.py's: the same loader, speed arrangement and `diffusion.pipeline.generate`, with
sample.py's defaults (DDIM, 50 steps, guidance 7.5, seed 42, each prompt from the seed afresh), so
`sample.py --ckpt MODEL --prompt P --n_samples 4` gives each prompt's images again. They are written to
OUTDIR/samples/NNNNN.png with OUTDIR/samples/prompts.jsonl (the format sample.py writes), the class
images to OUTDIR/class_samples/, the numbers to OUTDIR/scores.json: a run can be scored again with
`python -m dreambooth.evaluate --generated OUTDIR/samples ...`.
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

from dreambooth.scoring import (Inputs, UsageError, add_scoring_flags, check_models, check_scoring_flags,
                                device_and_precision, finish, images, model_path, score)


def benchmark_parser() -> argparse.ArgumentParser:
    from common.precision import SAMPLING_PRECISIONS
    from diffusion.samplers import SAMPLERS
    p = argparse.ArgumentParser(prog="python -m dreambooth.evaluate benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the fine-tuned model: what sample.py --ckpt takes (train_dreambooth.py's "
                                                   "--output_dir, or a single file)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA file fused into --model, as sample.py "
                                                                            "--lora (a --rank run's pytorch_lora_weights.safetensors)")
    p.add_argument("--subject", required=True, help="the subject's real photos (the training images)")
    p.add_argument("--class_noun", default=None, help="the subject's class, e.g. dog (default: the DreamBooth dataset's "
                                                      "class when --subject's folder is one of its 30 subjects)")
    p.add_argument("--live", action="store_true", help="a live subject (the dataset's dogs and cats): the live-subject "
                                                       "prompts (outfits, hats) instead of the object prompts")
    p.add_argument("--token", default="sks", help="the identifier the model was trained with (default sks)")
    p.add_argument("--images_per_prompt", type=int, default=4, help="images per prompt (the paper: 4)")
    p.add_argument("--num_prompts", type=int, default=25, help="the first N of the 25 prompts only (default all, the "
                                                               "paper's protocol; fewer for a quick look)")
    p.add_argument("--class_images", type=int, default=0, help='also generate this many images of "a CLASS_NOUN" '
                                                                "and report PRES (default 0: no PRES)")
    p.add_argument("--outdir", default=None, help="where the images and scores.json go (default "
                                                  "outputs/benchmark-SUBJECT); must not hold images yet")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="as sample.py (default ddim)")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps (default 50, as sample.py)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=42, help="each prompt's images start from this seed, as sample.py's")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's, 512 for SD v1)")
    p.add_argument("--W", type=int, default=None, help="image width (default: as --H)")
    p.add_argument("--sample_precision", default="fp32", choices=SAMPLING_PRECISIONS,
                   help="sample.py's --precision for generating (default fp32)")
    add_scoring_flags(p)
    return p


def subject_class(args: argparse.Namespace) -> None:
    """--class_noun and --live, from the flags or from the dataset's table for one of its subject folders."""
    from dreambooth.prompts import dataset_subject
    known = dataset_subject(Path(args.subject).name)
    if args.class_noun is None:
        if known is None:
            raise UsageError(f"--class_noun: needed: {Path(args.subject).name} is not one of the DreamBooth dataset's "
                             "subjects, whose classes are known (give the class noun, e.g. --class_noun dog)")
        args.class_noun, live = known
        args.live = args.live or live
    if not args.class_noun.strip():
        raise UsageError("--class_noun is empty")
    if not args.token.strip() or len(args.token.split()) != 1:
        raise UsageError(f"--token {args.token!r}: must be one word (the identifier, e.g. sks)")


def check_generation(args: argparse.Namespace) -> tuple:
    """--model, --lora, the sizes and --outdir, before anything loads; returns the model's configs."""
    from common.files import check_writable
    from common.images import IMAGE_SUFFIXES
    from diffusion.checkpoints.configs import read_configs
    from diffusion.checkpoints.lora_files import parse_lora_flags
    from diffusion.pipeline import check_size

    for flag in ("images_per_prompt", "ddim_steps", "num_prompts"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.num_prompts > 25:
        raise UsageError(f"--num_prompts {args.num_prompts}: the protocol has 25 prompts")
    if args.class_images < 0:
        raise UsageError(f"--class_images {args.class_images}: must be >= 0")
    model = model_path("--model", args.model)
    try:
        parse_lora_flags(args.lora or [])
        configs = read_configs(model, None, flags=("--model", "--config"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if configs is not None:
        unet, vae = configs
        args.H = args.H or unet.sample_size * vae.spatial_factor
        args.W = args.W or args.H
        try:
            check_size(args.H, args.W, unet, vae, names=("--H", "--W"))
        except ValueError as e:
            raise UsageError(str(e)) from None
    args.outdir = Path(args.outdir or f"outputs/benchmark-{Path(args.subject).resolve().name}")
    for sub in ("samples", "class_samples"):
        folder = args.outdir / sub
        if folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            raise UsageError(f"--outdir {args.outdir}: {sub}/ holds images already (an earlier run's); give a new "
                             "folder, or score those with python -m dreambooth.evaluate --generated")
    try:
        check_writable(args.outdir, "--outdir")
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.out = args.out or str(args.outdir / "scores.json")
    return configs


def save_png(image, path: Path) -> None:
    from common.files import atomic_write
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def load_models(args: argparse.Namespace, device):
    """--model (and --lora) as sample.py loads them: (models, the autocast dtype name or "fp32")."""
    from common.precision import DTYPES, check_device_runs, sampling_precision
    from common.state_dict import CheckpointError
    from diffusion.checkpoints.load import load_stable_diffusion
    from diffusion.checkpoints.lora_files import load_lora_files, parse_lora_flags
    from diffusion.speed import arrange_for_speed

    weights_dtype, autocast = sampling_precision(args.sample_precision, device)
    compute = autocast if autocast != "fp32" else next(k for k, v in DTYPES.items() if v == weights_dtype)
    try:
        check_device_runs(DTYPES[compute], device, flag="--sample_precision")
        models = load_stable_diffusion(args.model, dtype=weights_dtype)
        if args.lora:
            load_lora_files(models, parse_lora_flags(args.lora))
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    for module in (models.unet, models.vae, models.text_encoder):
        module.to(device).eval()
    arrange_for_speed(models, device=device, precision=compute)
    return models, autocast


def generate_images(args: argparse.Namespace, prompts: list[str], device) -> tuple[list[Path], list[Path]]:
    """The benchmark's images, as sample.py makes them; returns (samples, class samples) paths. The models
    are let go on return, before DINO and CLIP load."""
    from tqdm import tqdm

    from diffusion.pipeline import generate
    from dreambooth.prompts import record_prompt

    models, autocast = load_models(args, device)

    def run(prompt: str, n: int, seed: int):
        return generate(models, [prompt], num_images_per_prompt=n, steps=args.ddim_steps, guidance_scale=args.scale,
                        height=args.H, width=args.W, seed=seed, sampler=args.sampler, autocast=autocast,
                        progress=False, output="pil")

    samples, class_samples = args.outdir / "samples", args.outdir / "class_samples"
    samples.mkdir(parents=True, exist_ok=True)
    written, written_class = [], []
    for prompt in tqdm(prompts, desc="generating", unit="prompt"):
        for image in run(prompt, args.images_per_prompt, args.seed):
            path = samples / f"{len(written):05d}.png"
            save_png(image, path)
            record_prompt(samples, path.name, prompt)
            written.append(path)
    if args.class_images:
        class_samples.mkdir(parents=True, exist_ok=True)
        prompt = f"a {args.class_noun}"
        batches = range(0, args.class_images, args.images_per_prompt)
        for k, start in enumerate(tqdm(batches, desc=f"generating '{prompt}'", unit="batch")):
            n = min(args.images_per_prompt, args.class_images - start)
            for image in run(prompt, n, args.seed + k):          # batch k from seed + k: sample.py --n_iter
                path = class_samples / f"class-{len(written_class):05d}.png"
                save_png(image, path)
                written_class.append(path)
    return written, written_class


def run_benchmark(argv: list[str]) -> int:
    from dreambooth.prompts import benchmark_prompts, drop_token

    args = benchmark_parser().parse_args(argv)
    subject_class(args)
    check_scoring_flags(args)
    real = images(args.subject, "--subject")
    dino, clip = check_models(args)
    check_generation(args)
    device, _ = device_and_precision(args)
    prompts = benchmark_prompts(args.token, args.class_noun, live=args.live)[:args.num_prompts]
    generated, class_generated = generate_images(args, prompts, device)
    gc.collect()                                   # the diffusion models, before DINO and CLIP load
    as_read = [p for p in prompts for _ in range(args.images_per_prompt)]
    if args.drop_token:
        as_read = [drop_token(p, args.drop_token) for p in as_read]
    result = score(Inputs(real, generated, as_read, class_generated or None), args, dino, clip)
    result["benchmark"] = {"model": str(args.model), "lora": args.lora, "subject": str(args.subject),
                           "class_noun": args.class_noun, "live": args.live, "token": args.token,
                           "images_per_prompt": args.images_per_prompt, "num_prompts": args.num_prompts,
                           "class_images": args.class_images,
                           "sampler": args.sampler, "steps": args.ddim_steps, "scale": args.scale, "seed": args.seed,
                           "size": [args.H, args.W], "sample_precision": args.sample_precision,
                           "outdir": str(args.outdir)}
    finish(result, args.out)
    return 0
