"""Classify facial emotions in images, in batches; one JSON line per image.

    python predict_emotion.py --model PATH face.jpg photos/ 'more/*.png'

Each line is {"image": path, "predictions": [{"label": ..., "score": ...}, ...]} sorted by score,
or {"image": path, "error": "..."} for a file that is not a readable image (every other file is
still classified; the exit status is then 1).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from common.state_dict import CheckpointError
from vit.classifier import DTYPES, ImageClassifier
from vit.preprocess import IMAGE_SUFFIXES, ImageError, load_image


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image files, folders (walked for images) or glob patterns")
    p.add_argument("--model", required=True,
                   help="a transformers ViT folder, a timm folder/file or a bare .safetensors")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--top_k", type=int, default=5, help="labels per image (capped at the number of labels)")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep every label with score >= T instead of the top k (multi-label reading)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--quantize", default=None, choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error(f"--top_k {args.top_k}: must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold}: must be between 0 and 1 (scores are probabilities)")
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be at least 1")
    return args


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
        classifier = ImageClassifier(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    failed = bool(empty)
    for start in range(0, len(files), args.batch_size):
        loaded = {}                                   # path -> image, for the readable ones
        results = {}                                  # path -> the JSON line's content
        for path in files[start:start + args.batch_size]:
            try:
                loaded[path] = load_image(path)
            except ImageError as e:
                results[path] = {"image": path, "error": str(e)}
        if loaded:
            predictions = classifier.predict(list(loaded.values()), top_k=args.top_k, threshold=args.threshold)
            results.update({path: {"image": path, "predictions": preds} for path, preds in zip(loaded, predictions)})
        for path in files[start:start + args.batch_size]:  # print in input order
            failed |= "error" in results[path]
            print(json.dumps(results[path]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
