"""Reading a full-size SD v1 .ckpt with our restricted unpickler, against torch's own safe loader.

    flock /tmp/bench.lock .venv/bin/python bench/ckpt.py [--repeats 3] [--dtype fp16|fp32]

Writes (once, into --workdir) a checkpoint with every tensor of the public SD v1.5 single file
(tests/manifests/sd_v1_single_file.json), random values, as a Lightning-style dict without callbacks
(so that `torch.load(weights_only=True)` accepts it too), and its safetensors twin. Then times, each
run in a fresh subprocess (peak RSS is its own, the OS page cache is warm for all after the first):
- ours: `diffusion.checkpoints.ckpt.read_checkpoint` (zip + restricted unpickler + CRC check);
- torch: `torch.load(path, weights_only=True, map_location="cpu")`, torch's allowlisting loader;
- safetensors: `common.state_dict.read_safetensors` of the twin, for scale.
Prints medians of --repeats runs and ratios torch / ours (> 1: ours is faster). Needs only the
run-time requirements; torch is itself the reference here.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MANIFEST = ROOT / "tests" / "manifests" / "sd_v1_single_file.json"


def write_files(workdir: Path, dtype_name: str) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    ckpt, twin = workdir / f"sd15_{dtype_name}.ckpt", workdir / f"sd15_{dtype_name}.safetensors"
    if ckpt.exists() and twin.exists():
        return ckpt, twin
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    shapes = json.loads(MANIFEST.read_text())["model_tensors"]
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=gen).to(dtype) for k, shape in shapes.items()}
    torch.save({"epoch": 0, "global_step": 0, "state_dict": tensors}, ckpt)
    save_file(tensors, str(twin))
    return ckpt, twin


def worker(kind: str, path: str) -> None:
    import torch

    from common.state_dict import read_safetensors
    from diffusion.checkpoints.ckpt import read_checkpoint

    start = time.perf_counter()
    if kind == "ours":
        tensors = read_checkpoint(path)
    elif kind == "torch":
        tensors = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    else:
        tensors = read_safetensors(path)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "tensors": len(tensors)}))


def measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(path)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ckpt"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, twin = write_files(args.workdir, args.dtype)
    print(f"{ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB), {args.repeats} repeats, medians:")
    results = {}
    for kind, path in (("ours", ckpt), ("torch", ckpt), ("safetensors", twin)):
        measure(kind, path)  # warm the page cache
        runs = [measure(kind, path) for _ in range(args.repeats)]
        results[kind] = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_mib")}
        print(f"  {kind:12s} {results[kind]['seconds']:7.2f} s  peak RSS {results[kind]['peak_mib']:8.0f} MiB "
              f"({runs[0]['tensors']} tensors)")
    ours, torch_ = results["ours"], results["torch"]
    print(f"ratio torch/ours: time {torch_['seconds'] / ours['seconds']:.2f}, "
          f"peak memory {torch_['peak_mib'] / ours['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
