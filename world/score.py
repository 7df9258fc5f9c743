"""How well a text-to-image model draws the tiny world: prompt "a {colour} {shape}", check the image.

    python -m world.score --ckpt embedded/world_sd --seeds 4
    python -m world.score --sampler dpmpp_2m_karras --steps 20      # any sampler of diffusion/samplers
    python -m world.score --sampler euler --steps 5 10 20 --json out.json   # several step counts, one table

For every colour + shape combination, `--seeds` images are sampled (seed k for the k-th image of a
combination, with sample.py's defaults: 50 DDIM steps, guidance 7.5), and world/checker.py reads the
main object's colour and shape back. Accuracy is reported separately for the combinations the model
was trained on ("seen") and the HELD_OUT ones it never saw together ("held out": composition).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from diffusion.samplers import SAMPLERS
from world.checker import check
from world.world import combinations


@torch.no_grad()
def score(models, *, seeds: int = 4, steps: int = 50, guidance_scale: float = 7.5, batch: int = 8,
          splits: tuple[str, ...] = ("train", "held_out"), sampler: str = "ddim") -> dict:
    """{split: {"n", "colour", "shape", "both"}} accuracies, plus the seconds spent sampling."""
    from diffusion.pipeline import generate
    results, started = {}, time.perf_counter()
    for split in splits:
        prompts = [f"a {colour} {shape}" for colour, shape in combinations(split)]
        truth = [(colour, shape) for colour, shape in combinations(split)]
        right, n = Counter(), 0
        for k in range(seeds):
            for i in range(0, len(prompts), batch):
                # One seed per (image index k, batch): a batch's latents are one randn draw from it.
                images = generate(models, prompts[i:i + batch], seed=1000 * k + i, steps=steps,
                                  guidance_scale=guidance_scale, sampler=sampler, progress=False)
                for image, (colour, shape) in zip(images, truth[i:i + batch]):
                    found = check(image.numpy())
                    right["colour"] += found.colour == colour
                    right["shape"] += found.shape == shape
                    right["both"] += found.colour == colour and found.shape == shape
                    n += 1
        results["seen" if split == "train" else split] = {"n": n, **{k: right[k] / n for k in ("colour", "shape", "both")}}
    results["all"] = {"n": sum(results[s]["n"] for s in results),
                      **{k: sum(results[s][k] * results[s]["n"] for s in results) / sum(results[s]["n"] for s in results)
                         for k in ("colour", "shape", "both")}}
    results["seconds"] = time.perf_counter() - started
    return results


def plot(rows: list[dict], path: str, *, size: tuple[int, int] = (640, 400)) -> None:
    """Draw score ("all" split, colour + shape both right) against steps, one line per sampler, as a PNG.
    Plain PIL (no plotting library is a dependency): axes, ticks, a legend and a dashed DDIM-50 line."""
    from PIL import Image, ImageDraw
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    W, H = size
    left, right, top, bottom = 60, 150, 20, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    max_steps = max(r["steps"] for r in rows)
    scores = [r["all"]["both"] for r in rows]
    lo, hi = max(0.0, min(scores) - 0.05), min(1.0, max(scores) + 0.05)
    x_of = lambda steps: left + (W - left - right) * steps / max_steps
    y_of = lambda score: H - bottom - (H - top - bottom) * (score - lo) / (hi - lo)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for steps in sorted({r["steps"] for r in rows}):
        draw.line([x_of(steps), H - bottom, x_of(steps), H - bottom + 4], fill="black")
        draw.text((x_of(steps) - 6, H - bottom + 6), str(steps), fill="black")
    for i in range(6):
        score = lo + (hi - lo) * i / 5
        draw.line([left - 4, y_of(score), left, y_of(score)], fill="black")
        draw.text((8, y_of(score) - 6), f"{score:.0%}", fill="black")
    draw.text(((W - right + left) // 2 - 30, H - 20), "sampling steps", fill="black")
    draw.text((left, 4), "colour + shape right (all prompts)", fill="black")
    reference = [r["all"]["both"] for r in rows if r["sampler"] == "ddim" and r["steps"] == 50]
    if reference:  # dashed: DDIM at 50 steps, the CompVis default
        for x in range(left, W - right, 8):
            draw.line([x, y_of(reference[0]), x + 4, y_of(reference[0])], fill=(120, 120, 120))
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for k, name in enumerate(samplers):
        colour = colours[k % len(colours)]
        points = sorted((r["steps"], r["all"]["both"]) for r in rows if r["sampler"] == name)
        xy = [(x_of(s), y_of(v)) for s, v in points]
        draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([W - right + 10, top + 10 + 16 * k, W - right + 30, top + 10 + 16 * k], fill=colour, width=3)
        draw.text((W - right + 35, top + 4 + 16 * k), name, fill="black")
    if reference:
        y = top + 10 + 16 * len(samplers)
        draw.line([W - right + 10, y, W - right + 30, y], fill=(120, 120, 120))
        draw.text((W - right + 35, y - 6), "ddim, 50 steps", fill="black")
    image.save(path)


def table(rows: list[dict]) -> str:
    """A markdown table: one row per sampler, one column per step count ("all" split, both right),
    and the fewest steps at which the sampler reaches DDIM-50's score."""
    steps = sorted({r["steps"] for r in rows})
    reference = next(r["all"]["both"] for r in rows if r["sampler"] == "ddim" and r["steps"] == 50)
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " | reaches DDIM-50 at |",
             "| --- |" + " ---: |" * (len(steps) + 1)]
    for name in dict.fromkeys(r["sampler"] for r in rows):
        by_steps = {r["steps"]: r["all"]["both"] for r in rows if r["sampler"] == name}
        reached = next((s for s in steps if s in by_steps and by_steps[s] >= reference), None)
        lines.append(f"| {name} | " + " | ".join(f"{by_steps[s]:.1%}" if s in by_steps else "" for s in steps)
                     + f" | {reached if reached is not None else 'not within ' + str(max(steps))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from diffusion.checkpoints.load import load_stable_diffusion
    from embedded import WORLD_SD

    parser = argparse.ArgumentParser(prog="python -m world.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(WORLD_SD), help="model folder (default: the embedded one)")
    parser.add_argument("--seeds", type=int, default=4, help="images per colour + shape combination (4)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="sampling steps; several give one row each")
    parser.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (default ddim)")
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale (7.5, sample.py's default)")
    parser.add_argument("--json", help="append one JSON line per step count to this file")
    parser.add_argument("--report", nargs="+", metavar="JSONL",
                        help="sample nothing: print the markdown table of these --json files; with --plot, draw it")
    parser.add_argument("--plot", help="with --report: write the score-per-step plot to this PNG")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the tiny model gains nothing from more, and on a shared "
                             "machine the extra threads only spin: 40x slower measured under load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        rows = [json.loads(line) for path in args.report for line in open(path) if line.strip()]
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    if args.sampler not in SAMPLERS:
        parser.error(f"--sampler {args.sampler}: must be one of {', '.join(SAMPLERS)}")
    models = load_stable_diffusion(args.ckpt)
    for m in (models.unet, models.vae, models.text_encoder):
        m.eval()
    for steps in args.steps:
        result = score(models, seeds=args.seeds, steps=steps, guidance_scale=args.scale, sampler=args.sampler)
        print(f"{args.sampler}, {steps} steps:")
        for split in ("seen", "held_out", "all"):
            r = result[split]
            print(f"{split:>8}: {r['n']} images, colour {r['colour']:.1%}, shape {r['shape']:.1%}, both {r['both']:.1%}")
        print(f"sampling took {result['seconds']:.0f} s", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(dict(sampler=args.sampler, steps=steps, seeds=args.seeds, scale=args.scale,
                                         **result)) + "\n")


if __name__ == "__main__":
    main()
