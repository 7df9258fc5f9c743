"""How well a text-to-image model draws the tiny world: prompt "a {colour} {shape}", check the image.

    python -m world.score --ckpt embedded/world_sd --seeds 4

For every colour + shape combination, `--seeds` images are sampled (seed k for the k-th image of a
combination, with sample.py's defaults: 50 DDIM steps, guidance 7.5), and world/checker.py reads the
main object's colour and shape back. Accuracy is reported separately for the combinations the model
was trained on ("seen") and the HELD_OUT ones it never saw together ("held out": composition).
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from world.checker import check
from world.world import combinations


@torch.no_grad()
def score(models, *, seeds: int = 4, steps: int = 50, guidance_scale: float = 7.5, batch: int = 8,
          splits: tuple[str, ...] = ("train", "held_out")) -> dict:
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
                                  guidance_scale=guidance_scale, progress=False)
                for image, (colour, shape) in zip(images, truth[i:i + batch]):
                    found = check(image.numpy())
                    right["colour"] += found.colour == colour
                    right["shape"] += found.shape == shape
                    right["both"] += found.colour == colour and found.shape == shape
                    n += 1
        results["seen" if split == "train" else split] = {"n": n, **{k: right[k] / n for k in ("colour", "shape", "both")}}
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    from diffusion.checkpoints.load import load_stable_diffusion
    from embedded import WORLD_SD

    parser = argparse.ArgumentParser(prog="python -m world.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(WORLD_SD), help="model folder (default: the embedded one)")
    parser.add_argument("--seeds", type=int, default=4, help="images per colour + shape combination (4)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale (7.5, sample.py's default)")
    args = parser.parse_args(argv)
    models = load_stable_diffusion(args.ckpt)
    for m in (models.unet, models.vae, models.text_encoder):
        m.eval()
    result = score(models, seeds=args.seeds, steps=args.steps, guidance_scale=args.scale)
    for split in ("seen", "held_out"):
        r = result[split]
        print(f"{split:>8}: {r['n']} images, colour {r['colour']:.1%}, shape {r['shape']:.1%}, both {r['both']:.1%}")
    print(f"sampling took {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
