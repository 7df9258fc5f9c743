"""ViT-B/16 training-step speed on CPU, ours against transformers' ViTForImageClassification, one run.

    flock /tmp/bench.lock .venv-dev/bin/python bench/train_vit.py [--batch_size 8] [--rounds 3] [--iters 3]

One training step as train_emotion.py takes it: bf16 autocast forward, fp32 cross-entropy, backward,
AdamW step. Both models start from the same random weights (ours exported with save_pretrained and
read by transformers' from_pretrained), live in this one process, and are timed in alternating rounds
so machine noise hits both; prints the median samples/s of each and the ratio (> 1.0: ours faster).
transformers is optional: without it only ours is timed, and the script says so.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit.model import ViTConfig, ViTForImageClassification  # noqa: E402
from vit.preprocess import PreprocessConfig  # noqa: E402
from tools.reference_models import version, vit_classifier  # noqa: E402
from vit.weights import save_pretrained  # noqa: E402


def make_step(forward, model: torch.nn.Module, dtype: torch.dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=dtype):
            logits = forward(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=3, help="timed steps per round")
    args = p.parse_args()

    torch.manual_seed(0)
    ours = ViTForImageClassification(ViTConfig.b16()).train()
    steps = {"ours": make_step(ours, ours, torch.bfloat16)}
    if not version("transformers"):
        print("transformers is not installed: timing ours only")
    else:
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(ours, PreprocessConfig(), folder)
            theirs = vit_classifier(folder).train()   # same weights; dropout is 0 in both configs
        steps["transformers"] = make_step(lambda x: theirs(pixel_values=x).logits, theirs, torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 224, 224, generator=g)
    y = torch.randint(0, ours.config.num_labels, (args.batch_size,), generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-B/16 224x224, batch "
          f"{args.batch_size}, bf16 autocast + AdamW, {args.rounds} rounds x {args.iters} steps, medians")
    for step in steps.values():
        step(x, y)                                                        # warm-up (allocations, kernels)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.iters):
                t = time.perf_counter()
                step(x, y)
                times[name].append(time.perf_counter() - t)
    rate = {name: args.batch_size / statistics.median(ts) for name, ts in times.items()}
    line = ", ".join(f"{name} {r:.2f} samples/s" for name, r in rate.items())
    if "transformers" in rate:
        line += f"; ratio ours/transformers {rate['ours'] / rate['transformers']:.2f}x"
    print(line)


if __name__ == "__main__":
    main()
