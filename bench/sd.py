"""Speed and peak memory of our SD v1 UNet and VAE against diffusers', full size, random weights, CPU.

    flock /tmp/bench.lock .venv-dev/bin/python bench/sd.py [--repeats 3] [--only unet|vae] [--threads N]

Two workloads at 512x512, each in fp32, in bf16 (bf16 weights: sample.py --precision bf16, and
diffusers with torch_dtype=torch.bfloat16) and, with --precision autocast, under bf16 autocast over fp32
weights (sample.py --precision autocast):
- one classifier-free-guidance UNet step: batch 2 (unconditional + conditional) of 64x64x4 latents,
  77x768 text states;
- one VAE decode of a 64x64x4 latent to a 512x512 image.

Ours runs as sample.py runs it: arranged by diffusion/speed.py (the VAE's sub-pixel upsamplers, and
channels-last where that measured faster: bf16 UNet, VAE in both precisions). diffusers runs as its
pipeline ships (channels-first); `--their_layout channels_last` moves its models to channels-last too
(`.to(memory_format=...)`, as its docs suggest), for the comparison at equal layout.

Every measurement runs in a fresh subprocess, so its peak resident memory (getrusage's ru_maxrss) is
its own: we print the peak and the peak above the process's size once the model is built (the
activations' share). Times are medians of --rounds x --repeats runs (each subprocess warms up once first; the order of
the two sides alternates between rounds). Ratio = diffusers' time /
ours (> 1: ours is faster). Without diffusers installed, only our side runs, and the script says so.

This machine is shared and its speed swings: single runs of the same step vary by +-20%, and whole
5x3 medians of the bf16 UNet step have come out anywhere from 0.86x to 1.31x on unchanged code.
`--pairs N` adds a steadier figure: both sides in one process, timed in N alternating back-to-back
pairs, the median of the per-pair ratios with its quartiles.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.precision import sampling_precision  # noqa: E402
from diffusion.speed import LAYOUTS  # noqa: E402


def weights_dtype(precision: str) -> torch.dtype:
    """The weights' dtype of a --precision, as sample.py reads it ("autocast": fp32 weights)."""
    return sampling_precision(precision, torch.device("cpu"))[0]

SD_V1_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20




def build(impl: str, model: str, precision: str, their_layout: str) -> torch.nn.Module:
    """Ours arranged as sample.py arranges it for this precision on a CPU (diffusion/speed.py);
    diffusers' as shipped (channels-first), or channels-last as its docs suggest with --their_layout."""
    torch.manual_seed(0)
    if impl == "ours":
        from types import SimpleNamespace
        from diffusion.models.unet import UNet2DConditionModel, UNetConfig
        from diffusion.models.vae import AutoencoderKL, VAEConfig
        from diffusion.speed import arrange_for_speed
        net = (UNet2DConditionModel(config=UNetConfig.sd_v1()) if model == "unet"
               else AutoencoderKL(config=VAEConfig.sd_v1())).to(weights_dtype(precision))
        arrange_for_speed(SimpleNamespace(**{model: net}), device=torch.device("cpu"),
                          precision="bf16" if precision == "autocast" else precision)
        return net.eval()
    from tools.reference_models import autoencoder_kl, sd_v1_unet
    net = sd_v1_unet() if model == "unet" else autoencoder_kl(**SD_V1_VAE)
    return net.to(weights_dtype(precision)).to(memory_format=LAYOUTS[their_layout]).eval()


def workload(impl: str, model: str, net: torch.nn.Module):
    gen = torch.Generator().manual_seed(0)
    dtype = next(net.parameters()).dtype
    if model == "unet":
        latents = torch.randn(2, 4, 64, 64, generator=gen).to(dtype)
        t = torch.tensor([981, 981])
        text = torch.randn(2, 77, 768, generator=gen).to(dtype)
        if impl == "ours":
            return lambda: net(latents, t, text)
        return lambda: net(latents, t, text).sample
    z = torch.randn(1, 4, 64, 64, generator=gen).to(dtype)
    if impl == "ours":
        return lambda: net.decode(z)
    return lambda: net.decode(z).sample


def worker(impl: str, model: str, precision: str, repeats: int, threads: int, their_layout: str) -> None:
    torch.set_num_threads(threads)
    net = build(impl, model, precision, their_layout)
    run = workload(impl, model, net)
    base = rss_mb()
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = run()
            if i:  # the first run warms up (allocator, oneDNN kernel selection)
                times.append(time.perf_counter() - start)
            del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(median_s=statistics.median(times), times=times, peak_mb=peak, model_mb=base,
                          extra_mb=peak - base)))


def in_subprocess(what: str, *flags: str):
    """Run this script with `flags` in a fresh process; its last stdout line, parsed as JSON (None if it
    failed, after printing why). A fresh process per measurement keeps each peak memory its own."""
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True)
    if done.returncode:
        print(f"  {what} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(impl, model, precision, repeats, threads, their_layout) -> dict | None:
    return in_subprocess(f"{impl} {model} {precision}", "--worker", impl, model, precision,
                         "--repeats", str(repeats), "--threads", str(threads), "--their_layout", their_layout)


def pooled(results: list[dict | None]) -> dict | None:
    if any(r is None for r in results):
        return None
    times = [t for r in results for t in r["times"]]
    return dict(median_s=statistics.median(times), peak_mb=max(r["peak_mb"] for r in results),
                extra_mb=max(r["extra_mb"] for r in results))


def paired(model: str, precision: str, pairs: int, threads: int, their_layout: str) -> tuple[float, float, float]:
    """Both sides built in this one process and timed in alternating back-to-back pairs (the order flips
    each pair). Returns (median of the per-pair ratios diffusers/ours, its lower and upper quartile).
    Each ratio compares two runs a few seconds apart, so slow swings of the shared machine's speed,
    which move single runs by +-20% here, cancel instead of landing on one side."""
    torch.set_num_threads(threads)
    nets = {impl: build(impl, model, precision, their_layout) for impl in ("ours", "diffusers")}
    runs = {impl: workload(impl, model, net) for impl, net in nets.items()}
    ratios = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        for impl in runs:
            runs[impl]()                                      # warm-up
        for i in range(pairs):
            seconds = {}
            for impl in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                start = time.perf_counter()
                runs[impl]()
                seconds[impl] = time.perf_counter() - start
            ratios.append(seconds["diffusers"] / seconds["ours"])
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median, q1, q3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "PRECISION"), help=argparse.SUPPRESS)
    ap.add_argument("--pairs_worker", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess, after one warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="subprocesses per side, alternating the order")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", choices=["unet", "vae"])
    ap.add_argument("--their_layout", choices=list(LAYOUTS), default="channels_first",
                    help="diffusers' models as shipped (channels-first), or moved to channels-last as "
                         "diffusers' docs suggest; ours always run in the layout sample.py picks")
    ap.add_argument("--precision", choices=["fp32", "bf16", "autocast"])
    ap.add_argument("--pairs", type=int, default=0,
                    help="also time both sides in one process, N alternating pairs, and print the median "
                         "of the per-pair ratios (steadier than the subprocess medians on a noisy machine)")
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.repeats, args.threads, args.their_layout)
    if args.pairs_worker:
        return print(json.dumps(paired(*args.pairs_worker, args.pairs, args.threads, args.their_layout)))

    from tools.reference_models import version
    if version("diffusers"):
        impls = ["diffusers", "ours"]
    else:
        impls = ["ours"]
        print("diffusers is not installed: measuring our side only, no ratios")
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.rounds} x {args.repeats} runs "
          f"(each subprocess warms up once first); diffusers {args.their_layout.replace('_', '-')}, ours in "
          "sample.py's arrangement (diffusion/speed.py)", flush=True)
    print(f"{'workload':<30} {'impl':<10} {'median s':>9} {'peak MB':>9} {'act. MB':>9} {'speed ratio':>12}")
    for model in ["unet", "vae"] if args.only is None else [args.only]:
        for precision in ["fp32", "bf16"] if args.precision is None else [args.precision]:
            name = f"{'CFG UNet step, 2x64x64' if model == 'unet' else 'VAE decode 512x512'} {precision}"
            # alternate which side goes first, round by round, so a drift in the machine's load (it is
            # shared) does not always favour the same side; pool the timed runs of all rounds
            runs = {impl: [] for impl in impls}
            for r in range(args.rounds):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    runs[impl].append(measure(impl, model, precision, args.repeats, args.threads,
                                              args.their_layout))
            results = {impl: pooled(rs) for impl, rs in runs.items()}
            for impl, r in results.items():
                if r is None:
                    continue
                ratio = ""
                if impl == "ours" and results.get("diffusers"):
                    ratio = f"{results['diffusers']['median_s'] / r['median_s']:.2f}x"
                print(f"{name:<30} {impl:<10} {r['median_s']:>9.2f} {r['peak_mb']:>9.0f} {r['extra_mb']:>9.0f} "
                      f"{ratio:>12}", flush=True)
            pairs = args.pairs and "diffusers" in impls and in_subprocess(
                f"paired {model} {precision}", "--pairs_worker", model, precision, "--pairs", str(args.pairs),
                "--threads", str(args.threads), "--their_layout", args.their_layout)
            if pairs:
                median, q1, q3 = pairs
                print(f"{name:<30} {'paired':<10} {args.pairs} pairs in one process: ratio {median:.2f}x "
                      f"(quartiles {q1:.2f}-{q3:.2f})", flush=True)


if __name__ == "__main__":
    main()
