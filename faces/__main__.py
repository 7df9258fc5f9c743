"""Print the faces found in images, one JSON line per image: python -m faces [flags] image ...

    {"image": "photo.jpg", "faces": [[x, y, w, h], ...]}      or {"image": ..., "error": "..."}

The flags are detectMultiScale's parameters; --cascade reads another OpenCV HAAR cascade file.
The exit status is 1 when an image could not be read (the others are still processed).
"""
from __future__ import annotations

import argparse
import json
import sys

from PIL import Image, ImageOps, UnidentifiedImageError

from .cascade import DEFAULT_CASCADE, CascadeError, load_cascade
from .detect import detect_faces


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH, e.g. 30x30") from None
    return width, height


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m faces", description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--scale_factor", type=float, default=1.1)
    p.add_argument("--min_neighbors", type=int, default=3)
    p.add_argument("--min_size", type=_size, default=(30, 30), help="WxH (30x30)")
    p.add_argument("--max_size", type=_size, default=None, help="WxH (default: the image)")
    p.add_argument("--cascade", default=str(DEFAULT_CASCADE), help="an OpenCV HAAR cascade .xml")
    p.add_argument("--max_detect_side", type=int, default=None,
                   help="detect on a copy shrunk to at most this many pixels a side, boxes scaled back: much "
                        "faster on large photos, no longer OpenCV's exact boxes (default: off, exact)")
    args = p.parse_args(argv)
    if args.max_detect_side is not None and args.max_detect_side < 1:
        p.error(f"--max_detect_side {args.max_detect_side}: must be at least 1")
    try:
        cascade = load_cascade(args.cascade)
    except CascadeError as e:
        print(f"error: --cascade {e}", file=sys.stderr)
        return 2
    failed = False
    for path in args.images:
        try:
            with Image.open(path) as image:
                boxes = detect_faces(ImageOps.exif_transpose(image), scale_factor=args.scale_factor,
                                     min_neighbors=args.min_neighbors, min_size=args.min_size,
                                     max_size=args.max_size, cascade=cascade, max_side=args.max_detect_side)
            line = {"image": path, "faces": [list(b) for b in boxes]}
        except (OSError, UnidentifiedImageError, ValueError) as e:
            line, failed = {"image": path, "error": f"{path}: {e}"}, True
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
