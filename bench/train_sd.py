"""One DreamBooth training step of the full-size SD v1 UNet on CPU: ours against diffusers' UNet2DConditionModel,
for full fine-tuning and for DreamBooth-LoRA.

    flock /tmp/bench.lock .venv-dev/bin/python bench/train_sd.py [--case full|lora] [--rounds 2] [--steps 2]

--case full (the default): the step train_dreambooth.py takes at 256x256 with --train_batch_size 1
--with_prior_preservation --mixed_precision bf16 --gradient_checkpointing: random weights (860M parameters,
fp32), a batch of 1 instance + 1 class latent (2 x 4 x 32 x 32) with 77x768 text states, one UNet call under
bf16 autocast with gradient checkpointing, the split loss mse(instance) + 1.0 * mse(class), backward,
gradient clipping and an AdamW step (whose moments, 2 x 3.4 GB, are allocated on the first step; ours is
torch's fused AdamW as train_dreambooth.py uses it, diffusers' the per-tensor one its scripts use). Ours
against diffusers' examples/dreambooth/train_dreambooth.py step.

--case lora: the same step at 512x512 (latents 2 x 4 x 64 x 64) with --rank 4, three sides: ours as
train_dreambooth.py --rank 4 sets it up (dreambooth/steps.py's trainable_parameters: the frozen UNet cast
to bf16, rank-4 updates on to_q/to_k/to_v/to_out.0 kept in fp32, only they in AdamW), diffusers' as
examples/dreambooth/train_dreambooth_lora.py sets it up (the frozen UNet cast to its weight_dtype, a peft
adapter added by tools/reference_models.py; under bf16 the script leaves the adapter in bf16), and our full
fine-tuning at the same 512x512 for the memory saving. Targets: ours' LoRA peak RSS <= 40% of our full
fine-tuning's; ours' LoRA step time >= 1.0x diffusers' (diffusers' time / ours).

Both cases time the UNet's step alone: the frozen VAE and text encoder, which run without gradients and cost
the same whatever is trained, are left out on every side. Ours runs as train_dreambooth.py runs it there:
the UNet stored channels-last (diffusion/speed.py); diffusers' as its example script runs it
(channels-first), or channels-last with --their_layout.

Every measurement runs in a fresh subprocess (one per side per round, the sides in turn), so its peak
resident memory (getrusage's ru_maxrss) is its own. Each subprocess takes one warm-up step, then --steps
timed ones. Prints median step time and the largest peak RSS of each, and the ratios (speed: diffusers'
time / ours, > 1 means ours is faster; memory: ours / diffusers', < 1 means ours uses less). Without
diffusers (and, for LoRA, peft) installed, only our side runs, and the script says so.
`--pairs N` adds a steadier speed figure (this machine is shared and its speed swings by tens of
percent between runs): both sides built in one process and timed in N alternating back-to-back pairs, the
median of the per-pair ratios with its quartiles.
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
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.precision import DTYPES  # noqa: E402
from common.training import adamw  # noqa: E402
from diffusion.speed import LAYOUTS  # noqa: E402

VAE_FACTOR = 8
RESOLUTION = {"full": 256, "lora": 512}   # pixels, per --case (latents are 1/8 of this on a side)
RANK = 4                                  # train_dreambooth_lora.py's --rank default
PRIOR_LOSS_WEIGHT = 1.0
LEARNING_RATE = {"full": 1e-6, "lora": 5e-4}
# The sides each case runs: (implementation, what it trains), in the order of one round.
SIDES = {"full": [("ours", "full"), ("diffusers", "full")],
         "lora": [("ours", "lora"), ("diffusers", "lora"), ("ours", "full")]}


def build(impl: str, their_layout: str, precision: str) -> tuple[torch.nn.Module, callable]:
    """Ours arranged as train_dreambooth.py arranges it for bf16 on a CPU (diffusion/speed.py: channels-last);
    diffusers' as shipped (channels-first), or channels-last with --their_layout. Both fp32, as loaded."""
    torch.manual_seed(0)
    if impl == "ours":
        from diffusion.models.unet import UNet2DConditionModel, UNetConfig
        from diffusion.speed import arrange_for_speed
        unet = UNet2DConditionModel(config=UNetConfig.sd_v1())
        arrange_for_speed(SimpleNamespace(unet=unet), device=torch.device("cpu"), precision=precision)
        return unet, lambda x, t, c: unet(x, t, c)
    from tools.reference_models import sd_v1_unet
    unet = sd_v1_unet().to(memory_format=LAYOUTS[their_layout])
    return unet, lambda x, t, c: unet(x, t, c).sample


def trainable(impl: str, trains: str, unet: torch.nn.Module, precision: str) -> list[torch.nn.Parameter]:
    """Set the UNet up for training as each script does, with gradient checkpointing; returns what AdamW moves."""
    if impl == "ours":   # train_dreambooth.py's own step; the VAE and text encoder are left out (empty modules)
        from dreambooth.steps import trainable_parameters
        models = SimpleNamespace(unet=unet, vae=nn.Module(), text_encoder=nn.Module())
        return trainable_parameters(models, train_text_encoder=False, gradient_checkpointing=True,
                                    rank=RANK if trains == "lora" else None, precision=precision)
    params = list(unet.parameters())
    if trains == "lora":
        from tools.reference_models import add_dreambooth_lora
        params = add_dreambooth_lora(unet, rank=RANK, weight_dtype=DTYPES[precision])
    unet.train()
    unet.enable_gradient_checkpointing()
    return params


def setup(impl: str, trains: str, resolution: int, their_layout: str, precision: str) -> tuple[callable, list]:
    """One side built and set up for training; returns (step, what AdamW moves): step() takes one training
    step on fixed inputs and returns its wall time."""
    unet, forward = build(impl, their_layout, precision)
    params = trainable(impl, trains, unet, precision)
    # ours: train_dreambooth.py's optimizer (torch's fused AdamW); diffusers': its scripts' torch.optim.AdamW
    optimizer = (adamw if impl == "ours" else torch.optim.AdamW)(params, lr=LEARNING_RATE[trains], weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    side = resolution // VAE_FACTOR
    latents = torch.randn(2, 4, side, side, generator=g)         # instance + class
    noise = torch.randn(2, 4, side, side, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    states = torch.randn(2, 77, 768, generator=g)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = forward(latents + noise, t, states)
        per_image = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        instance, prior = per_image.chunk(2)
        (instance.mean() + PRIOR_LOSS_WEIGHT * prior.mean()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step, params


def child(impl: str, trains: str, steps: int, resolution: int, their_layout: str, precision: str) -> None:
    step, params = setup(impl, trains, resolution, their_layout, precision)
    built_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = [step() for _ in range(steps + 1)][1:]               # step 0 is the warm-up
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_mb": peak_mb, "built_mb": built_mb,
                      "trained_parameters": sum(p.numel() for p in params),
                      "trained_dtypes": sorted({str(p.dtype) for p in params})}))


def paired(trains: str, pairs: int, resolution: int, their_layout: str, precision: str) -> None:
    """Both sides in this one process, timed in alternating back-to-back pairs (the order flips each pair),
    so that the machine's swings hit both alike: prints the median per-pair ratio and its quartiles."""
    steps = {impl: setup(impl, trains, resolution, their_layout, precision)[0] for impl in ("ours", "diffusers")}
    for step in steps.values():
        step()                                                   # warm-up
    ratios = []
    for i in range(pairs):
        times = {impl: steps[impl]() for impl in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours"))}
        ratios.append(times["diffusers"] / times["ours"])
        print(f"pair {i}: ours {times['ours']:.2f} s, diffusers {times['diffusers']:.2f} s", flush=True)
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    print(f"paired, {pairs} pairs in one process: speed ratio diffusers/ours, {LABEL[trains]}: {median:.2f}x "
          f"(quartiles {q1:.2f}-{q3:.2f})")


LABEL = {"full": "full FT", "lora": "LoRA"}


def name(side: tuple[str, str]) -> str:
    return f"{side[0]} {LABEL[side[1]]}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=list(SIDES), default="full",
                   help="full: full fine-tuning, ours against diffusers; lora: DreamBooth-LoRA rank 4, ours against "
                        "diffusers, and against our full fine-tuning")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per side, the sides in turn")
    p.add_argument("--steps", type=int, default=2, help="timed steps per subprocess (after one warm-up)")
    p.add_argument("--resolution", type=int, help="pixels (a multiple of 64; default: 256 for full, 512 for lora)")
    p.add_argument("--their_layout", choices=list(LAYOUTS), default="channels_first",
                   help="diffusers' UNet as shipped, or moved to channels-last as its docs suggest")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: --mixed_precision bf16 (autocast; LoRA's frozen weights bf16); fp32: --mixed_precision no, "
                        "for a CPU without bf16 instructions, where bf16 is emulated ~100x slower")
    p.add_argument("--pairs", type=int, default=0,
                   help="also time ours and diffusers' in one process, N alternating pairs (steadier on a noisy machine)")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--trains", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    resolution = args.resolution or RESOLUTION[args.case]
    if args.child:
        child(args.child, args.trains, args.steps, resolution, args.their_layout, args.precision)
        return

    from tools.reference_models import version
    sides = SIDES[args.case]
    needed = ["diffusers"] + (["peft"] if args.case == "lora" else [])
    missing = [package for package in needed if not version(package)]
    if missing:
        print(f"{' and '.join(missing)} not installed: timing ours only")
        sides = [s for s in sides if s[0] == "ours"]
    what = "full fine-tuning" if args.case == "full" else f"DreamBooth-LoRA rank {RANK} (and our full fine-tuning)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD v1 UNet (random weights), {what}: "
          f"one training step at {resolution}x{resolution}, batch 1 instance + 1 class, "
          f"{'bf16 autocast' if args.precision == 'bf16' else 'fp32'}, gradient "
          f"checkpointing, AdamW; {args.rounds} rounds x {args.steps} steps, one subprocess each; ours "
          f"arranged as train_dreambooth.py runs it ({'channels-last' if args.precision == 'bf16' else 'channels-first'}), "
          f"diffusers {args.their_layout.replace('_', '-')}")
    results = {s: {"times": [], "peak_mb": 0.0, "built_mb": 0.0} for s in sides}
    for _ in range(args.rounds):
        for impl, trains in sides:
            run = subprocess.run([sys.executable, __file__, "--child", impl, "--trains", trains, "--steps",
                                  str(args.steps), "--resolution", str(resolution), "--their_layout", args.their_layout,
                                  "--precision", args.precision],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{name((impl, trains))} subprocess failed:\n{run.stderr[-3000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            result = results[(impl, trains)]
            result["times"] += r["times"]
            result["peak_mb"] = max(result["peak_mb"], r["peak_mb"])
            result["built_mb"] = max(result["built_mb"], r["built_mb"])
            result["trained"] = f"{r['trained_parameters'] / 1e6:.1f}M trained parameters, {'/'.join(r['trained_dtypes'])}"
    for side, r in results.items():
        print(f"{name(side):17s}: step {statistics.median(r['times']):6.2f} s (median of {len(r['times'])}), "
              f"peak RSS {r['peak_mb'] / 1024:5.2f} GiB ({r['built_mb'] / 1024:.2f} GiB once set up; {r['trained']})")

    trains = args.case                     # what ours and diffusers' are compared on
    if ("diffusers", trains) in results:
        ours, theirs = results[("ours", trains)], results[("diffusers", trains)]
        speed = statistics.median(theirs["times"]) / statistics.median(ours["times"])
        target = f"; target >= 1.0x: {'met' if speed >= 1.0 else 'NOT met'}" if args.case == "lora" else ""
        print(f"speed ratio diffusers/ours, {LABEL[trains]}: {speed:.2f}x (> 1: ours faster{target}); "
              f"peak memory ours/diffusers {ours['peak_mb'] / theirs['peak_mb']:.3f}")
    if args.case == "lora":
        lora, full = results[("ours", "lora")], results[("ours", "full")]
        ratio = lora["peak_mb"] / full["peak_mb"]
        print(f"peak RSS ours LoRA / ours full FT: {ratio:.3f} (target <= 0.40: {'met' if ratio <= 0.40 else 'NOT met'});"
              f" step time LoRA / full FT {statistics.median(lora['times']) / statistics.median(full['times']):.2f}")
    if args.pairs and ("diffusers", trains) in results:
        paired(trains, args.pairs, resolution, args.their_layout, args.precision)


if __name__ == "__main__":
    main()
