"""SDEdit's trade-off on a text-to-image model of the tiny world: image to image at each strength, checked.

    python -m world.sdedit --seeds 32 --json docs/sdedit.jsonl --picture docs/sdedit.png

One picture of the world (`PICTURE`: a large red square on the left, blue background) is edited with
prompts that ask for one change (`EDITS`: the object's colour, or the background's), at strengths 0.2 to
1.0, one image per seed (seed k gives `sample.py --init-img picture.png --strength S --seed k --n_samples 1`'s
image). world/checker.py reads each image back: "change made" when the asked attribute is the asked value,
"rest kept" when every other attribute (colour, shape, size, position, background) is the picture's.
Meng et al. 2022 ("SDEdit") describe this as realism against faithfulness: the more of the schedule is
run, the more the result follows the prompt and the less it keeps of the picture.

It also inpaints (`MASK_PROMPT`): the object kept (its region black in the mask), the background
repainted, at strength 1.0 (inpainting's default); "change made" is the asked background, "rest kept"
the object's colour, shape, size and position. Two masks (`MASK_MARGINS`): the object's own silhouette,
and the silhouette grown by 8 pixels (two latent cells of this model's VAE factor 4), which keeps a ring
of the old background around the object.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from world.checker import check
from world.scene import Scene, draw

PICTURE = Scene(colour="red", shape="square", size="large", position="left", background="blue")
# edit -> (prompt, the attribute it changes, the value asked); the prompts name only what they change
EDITS = {"object colour": ("a yellow square", "colour", "yellow"),
         "background": ("a square on a green background", "background", "green")}
MASK_PROMPT = ("a red square on a green background", "background", "green")
MASK_MARGINS = (0, 8)    # pixels of the old background kept around the object
STRENGTHS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def object_mask(scene: Scene, margin: int = 0) -> Image.Image:
    """White where the picture is repainted (the background), black on the object: the scene drawn white on
    black, binarised at half coverage (the checker's edge) and inverted; the black grown by `margin` pixels."""
    from PIL import ImageFilter
    silhouette = draw(Scene(colour="white", shape=scene.shape, size=scene.size, position=scene.position,
                            background="black", dx=scene.dx, dy=scene.dy))
    keep = np.asarray(silhouette.convert("L")) >= 128
    mask = Image.fromarray(np.where(keep, 0, 255).astype(np.uint8))
    if margin:
        mask = mask.filter(ImageFilter.MinFilter(2 * margin + 1))      # the kept (black) region grows
    return mask.convert("RGB")


def judge(image, scene: Scene, attribute: str, value: str) -> tuple[bool, bool]:
    """(change made, rest kept) for one image: `attribute` is `value`, every other attribute is the scene's."""
    found = check(image)
    rest = all(getattr(found, a) == getattr(scene, a) for a in ATTRIBUTES if a != attribute)
    return getattr(found, attribute) == value, rest


@torch.no_grad()
def measure(models, *, seeds: int, steps: int, strengths=STRENGTHS, sampler: str = "ddim",
            guidance_scale: float = 7.5) -> tuple[list[dict], dict]:
    """One row per (edit, strength) and the inpainting row, each over `seeds` images; and an example image
    (seed 0) per row, for the picture."""
    from diffusion.pipeline import generate
    picture = draw(PICTURE)
    cases = [(name, prompt, attribute, value, strength, None)
             for name, (prompt, attribute, value) in EDITS.items() for strength in strengths]
    cases += [(f"inpainting, margin {m}", *MASK_PROMPT, 1.0, m) for m in MASK_MARGINS]
    rows, examples = [], {}
    for name, prompt, attribute, value, strength, margin in cases:
        mask_image = None if margin is None else object_mask(PICTURE, margin)
        made = kept = 0
        started = time.perf_counter()
        for seed in range(seeds):
            image = generate(models, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                             init_image=picture, mask_image=mask_image, strength=strength, progress=False)[0]
            change, rest = judge(image.numpy(), PICTURE, attribute, value)
            made, kept = made + change, kept + rest
            if seed == 0:
                examples[(name, strength)] = Image.fromarray(image.numpy())
        rows.append(dict(edit=name, prompt=prompt, mask_margin=margin, strength=strength, seeds=seeds, steps=steps, sampler=sampler,
                         change_made=made / seeds, rest_kept=kept / seeds,
                         seconds=round(time.perf_counter() - started, 1)))
    return rows, examples


def table(rows: list[dict]) -> str:
    """Markdown: per strength, each edit's "change made" and "rest kept"."""
    edits = [e for e in dict.fromkeys(r["edit"] for r in rows) if not e.startswith("inpainting")]
    lines = ["| strength | " + " | ".join(f"{e}: change made | {e}: rest kept" for e in edits) + " |",
             "| ---: |" + " ---: | ---: |" * len(edits)]
    for strength in sorted({r["strength"] for r in rows if r["edit"] in edits}):
        cells = []
        for e in edits:
            row = next(r for r in rows if r["edit"] == e and r["strength"] == strength)
            cells += [f"{row['change_made']:.0%}", f"{row['rest_kept']:.0%}"]
        lines.append(f"| {strength:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture_sheet(examples: dict, strengths, *, scale: int = 2, gap: int = 4) -> Image.Image:
    """Rows: each edit (the picture, then seed 0's image at each strength) and the inpainting (the picture,
    then each mask and seed 0's image with it)."""
    from world.__main__ import grid
    picture = draw(PICTURE)
    cells = []
    for name in EDITS:
        cells += [picture] + [examples[(name, s)] for s in strengths]
    inpainting = [picture]
    for m in MASK_MARGINS:
        inpainting += [object_mask(PICTURE, m), examples[(f"inpainting, margin {m}", 1.0)]]
    blank = Image.new("RGB", picture.size, (255, 255, 255))
    cells += inpainting + [blank] * (len(strengths) + 1 - len(inpainting))
    return grid(cells, columns=len(strengths) + 1, scale=scale, gap=gap)


def main(argv: list[str] | None = None) -> None:
    from diffusion.checkpoints.load import load_stable_diffusion
    from embedded import WORLD_SD

    parser = argparse.ArgumentParser(prog="python -m world.sdedit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(WORLD_SD), help="model folder (default: the embedded one)")
    parser.add_argument("--seeds", type=int, default=32, help="images per edit and strength (32)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the whole schedule (50, sample.py's)")
    parser.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    parser.add_argument("--json", help="write one JSON line per row to this file")
    parser.add_argument("--picture", help="write the examples (seed 0) to this PNG")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny model gains nothing more)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or not all(0 < s <= 1 for s in args.strengths):
        parser.error("--seeds and --steps must be >= 1, every --strengths value in (0, 1]")
    torch.set_num_threads(args.threads)
    models = load_stable_diffusion(args.ckpt)
    rows, examples = measure(models, seeds=args.seeds, steps=args.steps, strengths=args.strengths)
    print(table(rows))
    for row in rows[-len(MASK_MARGINS):]:
        print(f"{row['edit']} ({row['prompt']!r}, strength 1.0): background made {row['change_made']:.0%}, "
              f"object kept {row['rest_kept']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.picture:
        picture_sheet(examples, args.strengths).save(args.picture)


if __name__ == "__main__":
    main()
