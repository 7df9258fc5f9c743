"""The memory factors behind the checks that refuse a size before any work (diffusion/pipeline.py's
UNET_MAPS and VAE_DECODER_MAPS, dreambooth/memory.py's UNET_TRAINING_MAPS, vit/memory.py's factors),
measured: the peak resident memory of one forward (or training step) above the process's memory just
before it, in its own process, divided by the work's size.

    python bench/sampling_memory.py                          # every case below, one CPU thread
    python bench/sampling_memory.py --cases unet-sd-1-512,vae-sd-1-512

A case is PART-MODEL-IMAGES-SIDE: PART is unet (sampling: a batch of 2 x IMAGES, as classifier-free
guidance runs it), vae (decoding IMAGES), unet_train (forward and backward of IMAGES crops) or vit /
vit_train; MODEL is sd (SD v1's architecture, random weights), embedded (embedded/world_sd's), or for the
ViT small / b16. Printed per case: the peak above the start, and that divided by (images x pixels x the
first level's width): the "maps" the constants count (for the ViT: floats per token and width; training:
per layer too). Weights are random (the memory does not depend on them); fp32, one thread. The peak is
Linux's ru_maxrss: allocator reuse makes small cases read high, so the slope between two sizes is the figure.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["unet-sd-1-512", "unet-sd-1-768", "vae-sd-1-256", "vae-sd-1-512", "unet-embedded-1-256",
         "unet-embedded-1-512", "vae-embedded-1-256", "vae-embedded-1-512", "unet_train-sd-1-128",
         "unet_train-sd-1-256", "unet_train-embedded-4-64", "unet_train-embedded-4-128", "vit-b16-32-224",
         "vit_train-b16-8-224", "vit_train-small-256-48"]


def measure(case: str) -> dict:
    """In this process: build the part, warm it up on a tiny input, then run the case and read the peak."""
    import torch
    sys.path.insert(0, str(ROOT))
    from common.state_dict import empty_model
    torch.set_num_threads(1)
    part, model, images, side = case.split("-")
    images, side = int(images), int(side)
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if part.startswith("vit"):
        from vit.model import ViTConfig, ViTForImageClassification
        config = ViTConfig.preset(model, image_size=side)
        net = ViTForImageClassification(config).train(part == "vit_train")
        width, per = config.hidden_size, (config.num_patches + 1) * (config.num_layers if part == "vit_train" else 1)

        def run(n, s):
            x = torch.randn(n, 3, s, s)
            if part == "vit_train":
                net(x).float().pow(2).mean().backward()
            else:
                with torch.no_grad():
                    net(x)
        run(1, side)
    else:
        from diffusion.models.unet import UNet2DConditionModel, UNetConfig
        from diffusion.models.vae import AutoencoderKL, VAEConfig
        folder = ROOT / "embedded" / "world_sd"
        uc = UNetConfig.sd_v1() if model == "sd" else UNetConfig.from_json(folder / "unet" / "config.json")
        vc = VAEConfig.sd_v1() if model == "sd" else VAEConfig.from_json(folder / "vae" / "config.json")
        f = vc.spatial_factor
        with empty_model():
            net = AutoencoderKL(config=vc) if part == "vae" else UNet2DConditionModel(config=uc)
        net = net.to_empty(device="cpu").train(part == "unet_train")
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02)
        width = vc.block_out_channels[0] if part == "vae" else uc.block_out_channels[0]
        per = side * side if part == "vae" else (side // f) ** 2 * (2 if part == "unet" else 1)

        def run(n, s):
            h = s // f
            if part == "vae":
                with torch.no_grad():
                    net.decode(torch.randn(n, vc.latent_channels, h, h))
                return
            b = 2 * n if part == "unet" else n
            x, ctx = torch.randn(b, uc.in_channels, h, h), torch.randn(b, 77, uc.cross_attention_dim)
            if part == "unet":
                with torch.no_grad():
                    net(x, torch.full((b,), 500), ctx)
            else:
                net(x, torch.full((b,), 500), ctx).float().pow(2).mean().backward()
                net.zero_grad(set_to_none=False)    # gradients stay allocated: counted as weights, not here
        run(1, f * 2 ** (len(uc.block_out_channels) - 1) * (1 if part == "vae" else 2))
    before = rss()
    run(images, side)
    above = peak() - before
    return {"case": case, "peak_above_mb": round(above / 2**20, 1),
            "per_pixel_width": round(above / (images * per * width), 1),
            "floats": round(above / (images * per * width) / 4, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)     # the child process's own case
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    for case in args.cases.split(","):          # each in its own process: ru_maxrss only grows
        run = subprocess.run([sys.executable, __file__, "--one", case], capture_output=True, text=True)
        print(run.stdout.strip() or f"{case}: failed\n{run.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
