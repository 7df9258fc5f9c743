"""Samplers: each turns the UNet's noise prediction at timestep t into the latents of the next step.

Every sampler has the same small interface, so the sampling loop (`diffusion/pipeline.py`, `denoise`)
knows none of them by type:

    sampler = make_sampler(scheduler_config, "ddim")   # on the checkpoint's own noise schedule
    timesteps = sampler.set_timesteps(steps)           # (steps,) descending
    x = x_T * sampler.init_noise_sigma
    for t in timesteps:
        x = sampler.step(eps(x, t), int(t), x, eta=eta, generator=generator)

A new sampler is one file in this folder and one line in `SAMPLERS`.
"""
from __future__ import annotations

from typing import Any, Mapping

from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.plms import PLMSSampler

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler}


def make_sampler(scheduler_config: Mapping[str, Any], name: str):
    """The sampler called `name`, on the checkpoint's own noise schedule (scheduler_config.json)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}: must be one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name].from_config(scheduler_config)
