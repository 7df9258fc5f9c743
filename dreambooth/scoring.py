"""What both `python -m dreambooth.evaluate` commands share (dreambooth/evaluate.py scores folders,
dreambooth/benchmark.py makes them first): the scoring flags, the checks of the input done before any model
loads, loading DINO and CLIP, the scores (dreambooth/metrics.py), the table and the JSON."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common.flags import UsageError   # the one class of a bad flag value (both commands raise it)

PAPER = {   # Ruiz et al. 2023: Table 1 (DreamBooth on Stable Diffusion; real images) and Table 3 (PRES)
    "dino": (0.668, 0.774), "clip_i": (0.803, 0.885), "clip_t": (0.305, None)}
PAPER_PRES = (0.493, 0.664)   # with prior preservation, without
NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES"}




# ---- the flags both commands share ----------------------------------------------------------------
def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dino", required=True, help="a DINO ViT: facebook/dino-vits16's folder (transformers ViTModel) "
                                                 "or timm's vit_small_patch16_224.dino (folder or .safetensors)")
    p.add_argument("--clip", required=True, help="a full CLIPModel: openai/clip-vit-large-patch14's folder "
                                                 "(config.json, model.safetensors, tokenizer and preprocessor files)")
    p.add_argument("--drop_token", default=None, metavar="WORD",
                   help="remove this identifier word from each prompt before CLIP-T (default: the prompt as written)")
    p.add_argument("--out", default=None, help="write the numbers here as JSON")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 (autocast) where the device computes it natively, else fp32")
    p.add_argument("--batch_size", type=int, default=16, help="images or prompts per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def model_path(flag: str, value: str) -> Path:
    """The file or folder a model flag names (a path, or a repo id in the local Hugging Face cache:
    common/hub_cache.py): the one place each model flag's path is resolved."""
    from common.hub_cache import resolve_model
    try:
        return resolve_model(value, flag=flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


def weights_file(flag: str, path: Path) -> Path | None:
    """The safetensors file whose header the checks below read before any model loads; None where the
    weights are sharded or a pickle (a repo without safetensors): the loader's strict load names what is
    wrong with those instead."""
    from common.state_dict import CheckpointError, find_weights
    if path.is_dir():
        try:
            path = find_weights(path, "transformers")
        except CheckpointError as e:
            raise UsageError(f"{flag} {path}: {e}") from None
    return path if path.suffix == ".safetensors" else None


def check_models(args: argparse.Namespace) -> tuple[Path, Path]:
    """--dino and --clip from their headers only: a DINO backbone, a CLIP model with both towers."""
    from clip.model_weights import check_clip_keys
    from common.state_dict import CheckpointError, safetensors_header
    from vit.dino import check_dino_file

    dino, clip = model_path("--dino", args.dino), model_path("--clip", args.clip)
    dino_weights, weights = weights_file("--dino", dino), weights_file("--clip", clip)
    try:
        if dino_weights is not None:
            check_dino_file(dino_weights)
    except CheckpointError as e:
        raise UsageError(f"--dino {args.dino}: {e}") from None
    if weights is None:
        return dino, clip
    try:
        vision, text = check_clip_keys(list(safetensors_header(weights)[0]), source=str(weights))
    except CheckpointError as e:
        raise UsageError(f"--clip {args.clip}: {e}") from None
    if not (vision and text):
        has, lacks, kind = (("image", "text", "CLIPVisionModelWithProjection") if vision else
                            ("text", "image", "CLIPTextModelWithProjection"))
        raise UsageError(f"--clip {args.clip}: {weights} holds CLIP's {has} tower only ({kind}); CLIP-I and "
                         f"CLIP-T need both: give a full CLIPModel (openai/clip-vit-large-patch14), which has the "
                         f"{lacks} tower too")
    return dino, clip


def check_scoring_flags(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.drop_token is not None and (not args.drop_token.strip() or len(args.drop_token.split()) != 1):
        raise UsageError(f"--drop_token {args.drop_token!r}: must be one word (the identifier, e.g. sks)")
    if args.out is not None:
        from common.files import check_writable
        out = Path(args.out)
        if out.suffix != ".json":
            raise UsageError(f"--out {args.out}: must end in .json")
        if out.is_dir():
            raise UsageError(f"--out {args.out}: is a folder")
        try:
            check_writable(out.parent, "--out")
        except ValueError as e:
            raise UsageError(str(e)) from None


def images(folder: str, flag: str) -> list[Path]:
    """The images of a folder, every file decoded once here (as train_dreambooth.py reads its folders:
    anything but sample.py's prompts.jsonl must be an image); none is an error naming the flag."""
    from dreambooth.data import DataError, image_files
    try:
        files = image_files(folder, flag=flag)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not files:
        raise UsageError(f"{flag} {folder}: no images in it")
    return files


def prompts_for(generated: list[Path], prompts_file: str, folder: str) -> list[str]:
    """Each generated image's prompt; the file must name every image of the folder and nothing else."""
    from dreambooth.prompts import read_prompts
    try:
        prompts = read_prompts(Path(prompts_file))
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = {f.name for f in generated}
    unknown = sorted(set(prompts) - names)
    if unknown:
        raise UsageError(f"--prompts {prompts_file}: names {len(unknown)} images that are not in --generated "
                         f"{folder}: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
    missing = sorted(names - set(prompts))
    if missing:
        raise UsageError(f"--prompts {prompts_file}: has no prompt for {len(missing)} images of --generated "
                         f"{folder}: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return [prompts[f.name] for f in generated]


def device_and_precision(args: argparse.Namespace):
    import torch
    from common.precision import DTYPES, check_device_runs, native_on_cpu
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    precision = args.precision
    if precision == "auto":
        native = native_on_cpu(torch.bfloat16) if device.type == "cpu" else (
            device.type == "cuda" and torch.cuda.is_bf16_supported())
        precision = "bf16" if native else "fp32"
    try:
        check_device_runs(DTYPES[precision], device, flag="--precision")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return device, precision


# ---- scoring ------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    real: list[Path]
    generated: list[Path]
    prompts: list[str]                    # as CLIP-T reads them (--drop_token applied)
    class_generated: list[Path] | None


def score(inputs: Inputs, args: argparse.Namespace, dino: Path, clip: Path) -> dict:
    """Load DINO and CLIP, embed, compute; the result as written to --out."""
    from tqdm import tqdm

    from clip.model_weights import load_clip
    from clip.tokenizer import CLIPTokenizer, TokenizerFileError
    from common.state_dict import CheckpointError
    from dreambooth.metrics import Embedder, amount_of_work, scores
    from vit.dino import load_dino

    device, precision = device_and_precision(args)
    try:
        dino_model = load_dino(dino)
    except CheckpointError as e:
        raise UsageError(f"--dino {args.dino}: {e}") from None
    try:
        clip_model = load_clip(clip)
        folder = clip_model.folder
        has_tokenizer = folder is not None and any((folder / f).exists() for f in ("vocab.json", "tokenizer.json"))
        tokenizer = CLIPTokenizer.from_pretrained(folder if has_tokenizer else None)
    except (CheckpointError, TokenizerFileError) as e:
        raise UsageError(f"--clip {args.clip}: {e}") from None
    dino_model.model.to(device)
    clip_model.model.to(device)
    n_class = len(inputs.class_generated or [])
    with tqdm(total=amount_of_work(len(inputs.real), len(inputs.generated), n_class), desc="embedding",
              unit="img", file=sys.stderr) as bar:
        embedder = Embedder(dino=dino_model, clip=clip_model, tokenizer=tokenizer, device=device, precision=precision,
                            batch_size=args.batch_size, progress=bar.update)
        result = scores(embedder, real=inputs.real, generated=inputs.generated, prompts=inputs.prompts,
                        class_generated=inputs.class_generated)
    per_prompt = result.pop("per_prompt")
    return {**result,
            "counts": {"real": len(inputs.real), "generated": len(inputs.generated), "class_generated": n_class,
                       "prompts": len(per_prompt)},
            "per_prompt": per_prompt,
            "settings": {"dino": str(args.dino), "clip": str(args.clip), "drop_token": args.drop_token,
                         "precision": precision, "device": str(device)}}


def table(result: dict) -> str:
    c = result["counts"]
    lines = [f"DreamBooth evaluation: {c['real']} real, {c['generated']} generated ({c['prompts']} prompts)"
             + (f", {c['class_generated']} class images" if c["class_generated"] else "")
             + f"; {result['settings']['precision']}",
             f"{'metric':8} {'score':>7} {'real images':>12}   paper (DreamBooth on SD / real images)"]
    for key in ("dino", "clip_i", "clip_t", "pres"):
        if key not in result:
            continue
        real = result.get(f"real_{key}")
        if key == "pres":
            paper = f"{PAPER_PRES[0]:.3f} with prior preservation, {PAPER_PRES[1]:.3f} without (Table 3)"
        else:
            ours_paper, real_paper = PAPER[key]
            paper = f"{ours_paper:.3f} / " + (f"{real_paper:.3f}" if real_paper is not None else "-")
        real = "-" if real is None else f"{real:.3f}"
        lines.append(f"{NAMES[key]:8} {result[key]:7.3f} {real:>12}   {paper}")
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    from common.files import atomic_write
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)   # check_writable proved it can be made, and left nothing
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finish(result: dict, out: str | None) -> None:
    print(table(result))
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")
