"""Dev-only: reference tensors for the samplers and whole text-to-image runs, from diffusers.

Run with the dev environment, after tools/make_reference_sd.py has written the tiny SD fixtures:

    .venv-dev/bin/python tools/make_reference_sampling.py

Writes under tests/fixtures/sampling/:
- schedulers.safetensors + schedulers.json: for each case (DDIMScheduler with eta 0 and eta > 0,
  PNDMScheduler(skip_prk_steps=True) with 1..10 steps, several beta schedules, spacings and
  prediction types) the starting latents, a fixed sequence of model outputs (one per model call)
  and diffusers' latents after every step; also the alphas_cumprod tables, add_noise and
  get_velocity outputs.
- pipeline/<run>.png + pipeline/<run>.json: whole StableDiffusionPipeline runs on the tiny diffusers
  folder (tests/fixtures/sd/tiny_diffusers), uint8 images exactly as the pipeline's "pil" output.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "sampling"
SD_FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"

# SD v1's scheduler_config.json values (runwayml/stable-diffusion-v1-5), as a DDIM/PNDM config.
SD_V1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
SD_V1_DDIM = dict(SD_V1, clip_sample=False)
SD_V1_PNDM = dict(SD_V1, skip_prk_steps=True)

LATENT_SHAPE = (2, 4, 4, 4)

# (name, sampler, scheduler config, steps, eta, noise seed or None)
SCHEDULER_CASES = [
    ("ddim_sd_eta0_10", "ddim", SD_V1_DDIM, 10, 0.0, None),
    ("ddim_sd_eta0.7_10", "ddim", SD_V1_DDIM, 10, 0.7, 123),
    ("ddim_sd_eta1_4", "ddim", SD_V1_DDIM, 4, 1.0, 7),
    ("ddim_vpred_trailing_6", "ddim", dict(SD_V1_DDIM, prediction_type="v_prediction",
                                            timestep_spacing="trailing", steps_offset=0), 6, 0.0, None),
    ("ddim_linear_linspace_clip_5", "ddim", dict(num_train_timesteps=1000, beta_schedule="linear",
                                                 timestep_spacing="linspace", clip_sample=True,
                                                 set_alpha_to_one=True), 5, 0.0, None),
    ("ddim_cosine_eta0.3_7", "ddim", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                          clip_sample=False, set_alpha_to_one=False), 7, 0.3, 5),
    ("plms_sd_1", "plms", SD_V1_PNDM, 1, 0.0, None),
    ("plms_sd_2", "plms", SD_V1_PNDM, 2, 0.0, None),
    ("plms_sd_3", "plms", SD_V1_PNDM, 3, 0.0, None),
    ("plms_sd_4", "plms", SD_V1_PNDM, 4, 0.0, None),
    ("plms_sd_10", "plms", SD_V1_PNDM, 10, 0.0, None),
    ("plms_vpred_trailing_5", "plms", dict(SD_V1_PNDM, prediction_type="v_prediction",
                                           timestep_spacing="trailing", steps_offset=0), 5, 0.0, None),
    ("plms_cosine_linspace_6", "plms", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                            timestep_spacing="linspace", skip_prk_steps=True), 6, 0.0, None),
]


def make_scheduler_fixtures() -> None:
    from diffusers import DDIMScheduler, PNDMScheduler

    tensors: dict[str, torch.Tensor] = {}
    cases = []
    g = torch.Generator().manual_seed(0)
    for name, sampler, config, steps, eta, seed in SCHEDULER_CASES:
        sched = DDIMScheduler(**config) if sampler == "ddim" else PNDMScheduler(**config)
        sched.set_timesteps(steps)
        timesteps = [int(t) for t in sched.timesteps]
        x = torch.randn(LATENT_SHAPE, generator=g)
        tensors[f"{name}.x_T"] = x
        noise_gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for i, t in enumerate(sched.timesteps):
            # a fixed model output per call, independent of x: the test feeds the same one
            model_output = torch.randn(LATENT_SHAPE, generator=g)
            if sampler == "ddim":
                x = sched.step(model_output, t, x, eta=eta, generator=noise_gen).prev_sample
            else:
                x = sched.step(model_output, t, x).prev_sample
            tensors[f"{name}.model_output.{i}"] = model_output
            tensors[f"{name}.x.{i}"] = x
        cases.append(dict(name=name, sampler=sampler, scheduler_config=dict(sched.config), steps=steps,
                          eta=eta, noise_seed=seed, timesteps=timesteps))

    # the forward process and the v target, on every beta schedule
    forward = []
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    noise = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    for beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config = dict(SD_V1_DDIM, beta_schedule=beta_schedule)
        sched = DDIMScheduler(**config)
        tensors[f"{beta_schedule}.alphas_cumprod"] = sched.alphas_cumprod
        tensors[f"{beta_schedule}.add_noise"] = sched.add_noise(x0, noise, t)
        tensors[f"{beta_schedule}.get_velocity"] = sched.get_velocity(x0, noise, t)
        forward.append(dict(beta_schedule=beta_schedule, scheduler_config=dict(sched.config)))
    tensors["forward.x0"], tensors["forward.noise"], tensors["forward.t"] = x0, noise, t

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "schedulers.safetensors"))
    (OUT / "schedulers.json").write_text(json.dumps(dict(cases=cases, forward=forward), indent=1) + "\n")
    print(f"wrote {OUT / 'schedulers.safetensors'} ({len(tensors)} tensors), {OUT / 'schedulers.json'}")


if __name__ == "__main__":
    make_scheduler_fixtures()
    if not SD_FOLDER.exists():
        sys.exit(f"{SD_FOLDER} does not exist yet (tools/make_reference_sd.py makes it): pipeline runs skipped")
