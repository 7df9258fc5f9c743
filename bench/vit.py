"""ViT-B/16 inference speed and peak memory, ours against transformers, measured in one run.

    python bench/vit.py [--batch_size 8] [--rounds 3] [--iters 5]

Both load the same random full-size weights (written once with our exporter). Each measurement runs
in its own subprocess so peak memory (max RSS above the bare interpreter + torch) belongs to one
model; rounds alternate ours/theirs so machine noise hits both. Prints medians and ratios
(>1.0 means ours is faster / smaller). transformers is optional: without it only ours is timed.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16")


def worker(impl: str, folder: str, dtype_name: str, batch_size: int, iters: int) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl == "ours":
        from vit.weights import load_vit
        model = load_vit(folder).model.to(dtype).eval()
        run = lambda x: model(x)
    else:
        from tools.reference_models import vit_classifier
        model = vit_classifier(folder, dtype=dtype).eval()
        run = lambda x: model(pixel_values=x).logits
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dtype)
    times = []
    with torch.inference_mode():
        run(x)  # warm-up
        for _ in range(iters):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps({"seconds": statistics.median(times), "peak_mb": peak_mb}))


def measure(impl, folder, dtype, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", impl, folder, dtype,
                          "--batch_size", str(args.batch_size), "--iters", str(args.iters)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "FOLDER", "DTYPE"))
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.batch_size, args.iters)

    import torch
    sys.path.insert(0, str(ROOT))
    from vit.model import ViTConfig, ViTForImageClassification
    from vit.preprocess import PreprocessConfig
    from vit.weights import save_pretrained
    from tools.reference_models import version
    if version("transformers"):
        impls = ("ours", "transformers")
    else:
        print("transformers is not installed: timing ours only")
        impls = ("ours",)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.iters} iterations, medians")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_pretrained(ViTForImageClassification(ViTConfig.b16()), PreprocessConfig(), folder)
        for dtype in DTYPES:
            results = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    results[impl].append(measure(impl, folder, dtype, args))
            summary = {impl: (statistics.median(r["seconds"] for r in rs), max(r["peak_mb"] for r in rs))
                       for impl, rs in results.items()}
            line = [f"{dtype}:"]
            for impl, (sec, mb) in summary.items():
                line.append(f"{impl} {args.batch_size / sec:6.1f} img/s, peak +{mb:5.0f} MB;")
            if "transformers" in summary:
                (so, mo), (st, mt) = summary["ours"], summary["transformers"]
                line.append(f"speed ratio ours/transformers {st / so:.2f}x, memory ratio {mo / mt:.2f}")
            print(" ".join(line), flush=True)


if __name__ == "__main__":
    main()
