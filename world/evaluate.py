"""How often the checker reads world images right, clean and degraded.

    python -m world.evaluate --n 3000 --blur 1.0 --noise 0.05

draws n samples of the world, optionally blurs them (Gaussian, sigma in pixels) and adds Gaussian
noise (sigma in [0, 1] units), runs the checker, and prints accuracy per attribute, the confusion
matrices of colour and shape, and the range of each shape's features (which set the thresholds in
world/checker.py). The degradations stand in for what a small VAE and a small UNet do to edges.
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from world.checker import check
from world.scene import COLOURS, SHAPES
from world.world import SPLITS, World

ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float image blurred by a Gaussian of `sigma` pixels (separable, edges reflected)."""
    if sigma <= 0:
        return image
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = image
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        n = out.shape[axis]
        out = sum(t * np.take(padded, np.arange(k, k + n), axis=axis) for k, t in enumerate(taps))
    return out


def degrade(image: np.ndarray, *, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> float (H, W, 3) in [0, 1], blurred then noised, then clipped like a decoded image."""
    x = gaussian_blur(image.astype(np.float64) / 255.0, blur)
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape)
    return np.clip(x, 0.0, 1.0)


def evaluate(world: World, n: int, *, blur: float = 0.0, noise: float = 0.0, seed: int = 0) -> dict:
    """Checker results on world samples 0..n-1: per-attribute accuracy, confusions, features per shape."""
    rng = np.random.default_rng(seed)
    right = Counter()
    confusion = {"colour": Counter(), "shape": Counter()}
    features: dict[str, list[dict]] = {shape: [] for shape in SHAPES}
    for i in range(n):
        image, _, truth = world.sample(i)
        found = check(degrade(np.asarray(image), blur=blur, noise=noise, rng=rng))
        for name in ATTRIBUTES:
            right[name] += getattr(found, name) == truth[name]
        right["colour+shape"] += found.colour == truth["colour"] and found.shape == truth["shape"]
        for name in confusion:
            confusion[name][truth[name], getattr(found, name)] += 1
        features[truth["shape"]].append(found.features)
    accuracy = {name: right[name] / n for name in (*ATTRIBUTES, "colour+shape")}
    return {"n": n, "accuracy": accuracy, "confusion": confusion, "features": features}


def print_confusion(counts: Counter, labels: list[str], title: str) -> None:
    found = labels + sorted({f for _, f in counts if f not in labels}, key=str)
    print(f"{title}: rows true, columns found")
    print(" " * 9 + "".join(f"{str(f)[:7]:>8}" for f in found))
    for t in labels:
        print(f"{t[:8]:>9}" + "".join(f"{counts[t, f]:>8}" for f in found))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m world.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0, help="world seed (the noise uses it too)")
    parser.add_argument("--split", choices=SPLITS, default="all")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--blur", type=float, default=0.0, help="Gaussian blur sigma in pixels (0)")
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma, image in [0, 1] (0)")
    args = parser.parse_args(argv)
    world = World(args.seed, split=args.split, image_size=args.image_size)
    result = evaluate(world, args.n, blur=args.blur, noise=args.noise, seed=args.seed)
    print(f"{args.n} samples, split {args.split}, {args.image_size} px, blur {args.blur}, noise {args.noise}")
    print("accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in result["accuracy"].items()))
    print_confusion(result["confusion"]["colour"], list(COLOURS), "colour")
    print_confusion(result["confusion"]["shape"], list(SHAPES), "shape")
    print("features per true shape (min / median / max):")
    for shape, rows in result["features"].items():
        cells = []
        for key in ("extent", "h3", "h4", "h5"):
            values = np.array([r[key] for r in rows if key in r])
            if len(values):
                cells.append(f"{key} {values.min():.2f}/{np.median(values):.2f}/{values.max():.2f}")
        print(f"  {shape:>8}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
