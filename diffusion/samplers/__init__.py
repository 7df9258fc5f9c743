"""Samplers: each turns the UNet's prediction at timestep t into the latents of the next step.

Every sampler has the same small interface, so the sampling loop (`diffusion/pipeline.py`, `denoise`)
knows none of them by type:

    sampler = make_sampler(scheduler_config, "dpmpp_2m")   # on the checkpoint's own noise schedule
    timesteps = sampler.set_timesteps(steps)               # (model calls,) descending
    x = x_T * sampler.init_noise_sigma                     # 1 for DDIM/PLMS/DPM-Solver, sigma_max-ish for Euler
    for t in timesteps:
        model_output = unet(sampler.scale_model_input(x, t), t)    # Euler feeds x / sqrt(sigma_ve^2 + 1)
        x = sampler.step(model_output, t, x, generator=generator)  # stochastic samplers draw from `generator`

Image to image (SDEdit) runs the last steps of the same schedule from an image's latents z_0 noised to
the first of them: `set_timesteps(steps, start=k)` returns the timesteps from step k on (diffusers'
`get_timesteps` with `set_begin_index`), and `add_noise(z_0, noise, i)` noises z_0 to the level of the
run's i-th model call (as the diffusers scheduler's `add_noise`; inpainting with a 4-channel UNet also
noises the kept region to each next step's level).

`model_output` is what the UNet predicts, eps, v or x_0 as the scheduler config's `prediction_type`
says; every sampler turns it into x_0 and eps by the one `predicted_x0_and_eps` (diffusion/schedule.py).

Options that only one sampler has are construction options (`make_sampler(..., "ddim", eta=0.5)`),
never arguments of `step`. A new sampler is one file in this folder and one line in `SAMPLERS`.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.dpmpp_2m import DPMSolverPP2MSampler
from diffusion.samplers.dpmpp_2m_karras import DPMSolverPP2MKarrasSampler
from diffusion.samplers.euler import EulerSampler
from diffusion.samplers.euler_a import EulerAncestralSampler
from diffusion.samplers.plms import PLMSSampler

SAMPLERS = {
    "ddim": DDIMSampler,                        # diffusers' DDIMScheduler
    "plms": PLMSSampler,                        # PNDMScheduler(skip_prk_steps=True)
    "dpmpp_2m": DPMSolverPP2MSampler,           # DPMSolverMultistepScheduler (its defaults)
    "dpmpp_2m_karras": DPMSolverPP2MKarrasSampler,  # the same with use_karras_sigmas=True
    "euler": EulerSampler,                      # EulerDiscreteScheduler
    "euler_a": EulerAncestralSampler,           # EulerAncestralDiscreteScheduler
}
SAMPLERS_WITH_ETA = ("ddim",)


class Sampler(Protocol):
    """What `denoise` needs of a sampler (every class in `SAMPLERS` has exactly this)."""

    @property
    def init_noise_sigma(self) -> float | torch.Tensor: ...   # x_T = N(0, I) * init_noise_sigma

    def set_timesteps(self, num_steps: int, *, start: int = 0) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor: ...

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, t: torch.Tensor | float, x: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor: ...


def make_sampler(scheduler_config: Mapping[str, Any], name: str, *, eta: float | None = None) -> Sampler:
    """The sampler called `name`, on the checkpoint's own noise schedule (scheduler_config.json).

    eta: DDIM's eta (DDIM eq. 16), None for its default 0. Any other sampler refuses an eta: it either
    has no noise to scale (PLMS, DPM-Solver++ 2M, Euler) or its noise is fixed by the method (Euler a).
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}: must be one of {', '.join(SAMPLERS)}")
    if name in SAMPLERS_WITH_ETA:
        return SAMPLERS[name].from_config(scheduler_config, eta=0.0 if eta is None else eta)
    if eta is not None:
        raise ValueError(f"eta={eta} with sampler={name!r}: only {', '.join(SAMPLERS_WITH_ETA)} takes an eta")
    return SAMPLERS[name].from_config(scheduler_config)
