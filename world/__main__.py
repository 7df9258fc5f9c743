"""python -m world --n 16 --out DIR: a grid of the first n samples (grid.png) and their captions
(captions.txt, one "index<TAB>caption<TAB>attributes as JSON" line per sample)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image

from world.world import SPLITS, World


def grid(images: list[Image.Image], *, columns: int, scale: int, gap: int) -> Image.Image:
    """Images (all the same size) side by side, `columns` a row, each enlarged `scale` times."""
    side = images[0].width * scale
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (side + gap) + gap, rows * (side + gap) + gap), (255, 255, 255))
    for k, image in enumerate(images):
        row, column = divmod(k, columns)
        big = image.resize((side, side), Image.Resampling.NEAREST)
        sheet.paste(big, (gap + column * (side + gap), gap + row * (side + gap)))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m world", description=__doc__)
    parser.add_argument("--n", type=int, default=16, help="how many samples (16)")
    parser.add_argument("--out", type=Path, required=True, help="folder for grid.png and captions.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--start", type=int, default=0, help="index of the first sample (0)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--scale", type=int, default=2, help="enlargement in the grid (2)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: must be >= 1")
    world = World(args.seed, split=args.split, image_size=args.image_size)
    samples = [world.sample(i) for i in range(args.start, args.start + args.n)]
    args.out.mkdir(parents=True, exist_ok=True)
    columns = math.ceil(math.sqrt(args.n))
    grid([image for image, _, _ in samples], columns=columns, scale=args.scale, gap=4).save(args.out / "grid.png")
    lines = [f"{args.start + k}\t{text}\t{json.dumps(attrs)}" for k, (_, text, attrs) in enumerate(samples)]
    (args.out / "captions.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'grid.png'} ({columns} columns, row by row) and {args.out / 'captions.txt'}")


if __name__ == "__main__":
    main()
