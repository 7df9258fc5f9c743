"""One DreamBooth training step of the full-size SD v1 UNet on CPU: ours against diffusers' UNet2DConditionModel.

    flock /tmp/bench.lock .venv-dev/bin/python bench/train_sd.py [--rounds 2] [--steps 2]

The step train_dreambooth.py takes at 256x256 with --train_batch_size 1 --with_prior_preservation
--mixed_precision bf16 --gradient_checkpointing: random weights (860M parameters, fp32), a batch of
1 instance + 1 class latent (2 x 4 x 32 x 32) with 77x768 text states, one UNet call under bf16
autocast with gradient checkpointing, the split loss mse(instance) + 1.0 * mse(class), backward,
gradient clipping and an AdamW step (whose moments, 2 x 3.4 GB, are allocated on the first step).
Ours runs as train_dreambooth.py runs it there: the UNet stored channels-last (diffusion/speed.py);
diffusers' as its example script runs it (channels-first), or channels-last with --their_layout.

Every measurement runs in a fresh subprocess (one per implementation per round, rounds alternating), so
its peak resident memory (getrusage's ru_maxrss) is its own. Each subprocess takes one warm-up step,
then --steps timed ones. Prints median step time and the largest peak RSS of each, and the ratios
(speed: diffusers' time / ours, > 1 means ours is faster; memory: ours / diffusers', < 1 means ours uses
less). Without diffusers installed, only our side runs, and the script says so.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from diffusion.speed import LAYOUTS  # noqa: E402

RESOLUTION, VAE_FACTOR = 256, 8
PRIOR_LOSS_WEIGHT = 1.0


def build(impl: str, their_layout: str) -> tuple[torch.nn.Module, callable]:
    """Ours arranged as train_dreambooth.py arranges it for bf16 on a CPU (diffusion/speed.py: channels-last);
    diffusers' as shipped (channels-first), or channels-last with --their_layout."""
    torch.manual_seed(0)
    if impl == "ours":
        from types import SimpleNamespace
        from diffusion.models.unet import UNet2DConditionModel, UNetConfig
        from diffusion.speed import arrange_for_speed
        unet = UNet2DConditionModel(config=UNetConfig.sd_v1())
        arrange_for_speed(SimpleNamespace(unet=unet), device=torch.device("cpu"), precision="bf16")
        return unet, lambda x, t, c: unet(x, t, c)
    from tools.reference_models import sd_v1_unet
    unet = sd_v1_unet().to(memory_format=LAYOUTS[their_layout])
    return unet, lambda x, t, c: unet(x, t, c).sample


def child(impl: str, steps: int, their_layout: str) -> None:
    unet, forward = build(impl, their_layout)
    unet.train()
    unet.enable_gradient_checkpointing()
    built_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    side = RESOLUTION // VAE_FACTOR
    latents = torch.randn(2, 4, side, side, generator=g)         # instance + class
    noise = torch.randn(2, 4, side, side, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    states = torch.randn(2, 77, 768, generator=g)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = forward(latents + noise, t, states)
        per_image = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        instance, prior = per_image.chunk(2)
        (instance.mean() + PRIOR_LOSS_WEIGHT * prior.mean()).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i > 0:                                                # step 0 is the warm-up
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_mb": peak_mb, "built_mb": built_mb}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per implementation, alternating")
    p.add_argument("--steps", type=int, default=2, help="timed steps per subprocess (after one warm-up)")
    p.add_argument("--their_layout", choices=list(LAYOUTS), default="channels_first",
                   help="diffusers' UNet as shipped, or moved to channels-last as its docs suggest")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.their_layout)
        return

    impls = ["ours"]
    from tools.reference_models import version
    if version("diffusers"):
        impls.append("diffusers")
    else:
        print("diffusers is not installed: timing ours only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD v1 UNet (random weights) training "
          f"step at {RESOLUTION}x{RESOLUTION}, batch 1 instance + 1 class, bf16 autocast, gradient checkpointing, "
          f"AdamW; {args.rounds} rounds x {args.steps} steps, one subprocess each; ours channels-last as "
          f"train_dreambooth.py runs it, diffusers {args.their_layout.replace('_', '-')}")
    results = {impl: {"times": [], "peak_mb": 0.0, "built_mb": 0.0} for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            run = subprocess.run([sys.executable, __file__, "--child", impl, "--steps", str(args.steps),
                              "--their_layout", args.their_layout],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{impl} subprocess failed:\n{run.stderr[-3000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            results[impl]["times"] += r["times"]
            results[impl]["peak_mb"] = max(results[impl]["peak_mb"], r["peak_mb"])
            results[impl]["built_mb"] = max(results[impl]["built_mb"], r["built_mb"])
    for impl, r in results.items():
        print(f"{impl:9s}: step {statistics.median(r['times']):6.2f} s (median of {len(r['times'])}), "
              f"peak RSS {r['peak_mb'] / 1024:5.2f} GiB ({r['built_mb'] / 1024:.2f} GiB once built)")
    if "diffusers" in results:
        ours, theirs = results["ours"], results["diffusers"]
        print(f"speed ratio diffusers/ours {statistics.median(theirs['times']) / statistics.median(ours['times']):.2f}x"
              f" (> 1: ours faster); peak memory ours/diffusers {ours['peak_mb'] / theirs['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
