"""Classify facial emotions in images, in batches; one JSON line per image.

    python predict_emotion.py [--model PATH] face.jpg photos/ 'more/*.png'

Each line is {"image": path, "predictions": [{"label": ..., "score": ...}, ...]} sorted by score,
or {"image": path, "error": "..."} for a file that is not a readable image (every other file is
still classified; the exit status is then 1).

With --faces each face found (faces/, OpenCV's Haar cascade) is cropped and classified instead:
{"image": path, "faces": [{"box": [x, y, w, h], "predictions": [...]}, ...]}; "faces": [] when
there is none (plus the whole image's "predictions" with --fallback_whole_image). --box x,y,w,h
classifies given regions the same way, without detection.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import torch

from common.files import check_writable
from common.flags import UsageError, check_device
from common.hub_cache import resolve_model
from common.precision import slow_precision_warning
from common.state_dict import CheckpointError
from embedded import EMOTION_VIT
from faces import detect_faces
from faces.crops import DEFAULT_MARGIN, check_inside, crop, crop_box, draw_faces, parse_box
from vit.classifier import DTYPES, NON_FINITE, ImageClassifier
from common.images import IMAGE_SUFFIXES, ImageError, header_pixels, load_image


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image files, folders (walked for images) or glob patterns")
    p.add_argument("--model", default=str(EMOTION_VIT),
                   help="a transformers ViT folder, a timm folder/file or a bare .safetensors, or a repo id of "
                        "the Hugging Face cache, org/name[@revision] (default: the embedded demo model, trained on synthetic cartoon faces only: embedded/emotion_vit)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--top_k", type=int, default=5, help="labels per image (capped at the number of labels)")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep every label with score >= T instead of the top k (multi-label reading)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--quantize", default=None, choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    p.add_argument("--faces", action="store_true", help="detect faces and classify each face crop")
    p.add_argument("--face_margin", type=float, default=DEFAULT_MARGIN,
                   help="with --faces: grow each face box by this fraction of its size on every side")
    p.add_argument("--fallback_whole_image", action="store_true",
                   help="with --faces: classify the whole image when it has no face")
    p.add_argument("--box", action="append", metavar="x,y,w,h",
                   help="classify this region, without detection (repeat for several)")
    p.add_argument("--draw", metavar="DIR", help="with --faces/--box: save each image with boxes and top labels")
    args = p.parse_args(argv)
    for flag, value in (("--threshold", args.threshold), ("--face_margin", args.face_margin)):
        if value is not None and not math.isfinite(value):   # nan passes every comparison below
            p.error(f"{flag} {value}: must be a finite number")
    if args.top_k < 1:
        p.error(f"--top_k {args.top_k}: must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold}: must be between 0 and 1 (scores are probabilities)")
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be at least 1")
    if args.faces and args.box:
        p.error("--faces and --box: choose one (--box classifies given regions without detection)")
    if args.fallback_whole_image and not args.faces:
        p.error("--fallback_whole_image only applies with --faces")
    if args.face_margin < 0:
        p.error(f"--face_margin {args.face_margin}: must be >= 0 (a fraction of the box size)")
    if args.draw and not (args.faces or args.box):
        p.error("--draw needs --faces or --box (it draws their boxes)")
    try:
        args.box = [parse_box(text) for text in args.box or []]
    except ValueError as e:
        p.error(f"--box {e}")
    try:
        check_device(args.device)
        if args.draw:
            check_writable(args.draw, "--draw")     # a file, under a file, read-only: named before any work
    except ValueError as e:
        p.error(str(e))
    return args


def check_batch_memory(classifier: ImageClassifier, files: list[str], args) -> None:
    """The largest batch of --batch_size files decoded (RGB, from their headers, with a converted copy) and the
    model's activations for it, against the memory there is, before any image is decoded."""
    from common.memory import check_memory
    from vit.memory import batch_bytes
    batch = min(args.batch_size, len(files))
    pixels = [header_pixels(f) for f in files]
    decoded = max(sum(pixels[i:i + batch]) for i in range(0, len(files), batch)) * 3 * 2
    config = getattr(classifier.model, "config", None)
    activations = batch_bytes(config, batch, training=False) if config is not None else 0
    device = torch.device(args.device)
    what = f"--batch_size {args.batch_size} ({batch} images"
    if device.type == "cpu":
        check_memory(activations + decoded, device=device, what=f"{what}, decoded)", advice="lower --batch_size")
    else:
        check_memory(decoded, device="cpu", what=f"{what}, decoded)", advice="lower --batch_size")
        check_memory(activations, device=device, what=f"{what} on {device})", advice="lower --batch_size")


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files named, found in folders, or matched by globs, in order; and the inputs that matched nothing."""
    files, empty = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found = [item]
        else:
            found = sorted(glob.glob(item, recursive=True))
            found = [f for f in found if Path(f).is_file()]
        if not found:
            empty.append(item)
        files.extend(found)
    return files, empty


def classify_regions(classifier: ImageClassifier, loaded: dict, args) -> dict:
    """--faces / --box: crop every region of every image, classify the crops in batches, and
    return each image's JSON line content (an error for an image where that fails)."""
    results, regions = {}, {}                         # path -> JSON line / list of boxes
    for path, image in loaded.items():
        try:
            if args.faces:
                regions[path] = detect_faces(image)
            else:
                for box in args.box:
                    check_inside(box, image.size)
                regions[path] = list(args.box)
        except ValueError as e:
            results[path] = {"image": path, "error": f"{path}: {e}"}
    crops, owners = [], []                            # owners: (path, box or None for the whole image)
    for path, boxes in regions.items():
        image = loaded[path]
        margin = args.face_margin if args.faces else 0.0
        crops += [crop(image, crop_box(box, margin, image.size)) for box in boxes]
        owners += [(path, box) for box in boxes]
        if not boxes and args.fallback_whole_image:
            crops.append(image)
            owners.append((path, None))
        results[path] = {"image": path, "faces": []}
    predictions = []
    for start in range(0, len(crops), args.batch_size):
        predictions += classifier.predict(crops[start:start + args.batch_size], top_k=args.top_k,
                                          threshold=args.threshold)
    for (path, box), preds in zip(owners, predictions):
        if box is None:
            results[path]["predictions"] = preds
        else:
            results[path]["faces"].append({"box": list(box), "predictions": preds})
    return results


def save_drawing(image, result: dict, folder: Path, used: set) -> None:
    """--draw: the image with its boxes and top labels, as FOLDER/<file stem>.png (made unique)."""
    faces = result["faces"] or ([{"box": [0, 0, *image.size], "predictions": result["predictions"]}]
                                if "predictions" in result else [])
    name, n = Path(result["image"]).stem, 1
    while name in used:
        name, n = f"{Path(result['image']).stem}_{n}", n + 1
    used.add(name)
    draw_faces(image, faces).save(folder / f"{name}.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    files, empty = expand_inputs(args.inputs)
    for item in empty:
        kind = "folder has no image files" if Path(item).is_dir() else "no such file, and no file matches it"
        print(f"error: {item}: {kind}", file=sys.stderr)
    if not files:
        print("error: no images to classify", file=sys.stderr)
        return 2
    try:
        classifier = ImageClassifier(resolve_model(args.model), device=args.device, dtype=args.dtype,
                                     quantize=args.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    try:   # a batch's images and activations, against the memory there is
        check_batch_memory(classifier, files, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning := slow_precision_warning(DTYPES[args.dtype], torch.device(args.device), flag="--dtype"):
        print(warning, file=sys.stderr)
    if args.draw:
        Path(args.draw).mkdir(parents=True, exist_ok=True)
    failed, drawn = bool(empty), set()
    for start in range(0, len(files), args.batch_size):
        loaded = {}                                   # path -> image, for the readable ones
        results = {}                                  # path -> the JSON line's content
        for path in files[start:start + args.batch_size]:
            try:
                loaded[path] = load_image(path)
            except ImageError as e:
                results[path] = {"image": path, "error": str(e)}
        if loaded and (args.faces or args.box):
            results.update(classify_regions(classifier, loaded, args))
        elif loaded:
            predictions = classifier.predict(list(loaded.values()), top_k=args.top_k, threshold=args.threshold)
            results.update({path: {"image": path, "predictions": preds} for path, preds in zip(loaded, predictions)})
        for path in files[start:start + args.batch_size]:  # print in input order
            try:
                line = json.dumps(results[path], allow_nan=False)
            except ValueError:      # a NaN or infinite score: this image's error, never a bare NaN (not JSON)
                results[path] = {"image": path, "error": f"{path}: {NON_FINITE}"}
                line = json.dumps(results[path])
            failed |= "error" in results[path]
            if args.draw and "error" not in results[path]:
                save_drawing(loaded[path], results[path], Path(args.draw), drawn)
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
