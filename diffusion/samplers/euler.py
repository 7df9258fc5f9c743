"""Euler sampling in sigma (Karras et al. 2022, "Elucidating the Design Space...", Algorithm 2 with
S_churn = 0, i.e. the deterministic Algorithm 1 without its Heun correction).

Numerically equal to diffusers' `EulerDiscreteScheduler` with its defaults (tested per step against
stored reference latents). In the sigma view (`sigmas.py`; every sigma in this file is that VE noise
level, sigma_ve, Karras et al.'s sigma) the probability-flow ODE is

    dx/dsigma = (x - D(x; sigma)) / sigma                                            (EDM eq. 3, s(t) = 1)

where D is the denoiser, the model's estimate of x_0. One Euler step from sigma_i to sigma_{i+1}:

    d_i = (x_i - D(x_i; sigma_i)) / sigma_i                                          (Algorithm 2, line 7)
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i                                      (Algorithm 2, line 8)

With an eps-predicting UNet, D(x; sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)): the latents x
live on the VE scale (x_0 + sigma eps), and the UNet, trained on the VP scale, sees them divided by
sqrt(sigma^2 + 1) (`scale_model_input`, EDM Table 1's c_in). For any prediction type, D is the x_0 of
`predicted_x0_and_eps` (diffusion/schedule.py) on that scale: alpha_t = 1, sigma_t = sigma. The run
starts from x_T = sigma_max-ish times N(0, I) (`init_noise_sigma`) and ends on sigma = 0, where x is the
clean latent.

Usage:
    sampler = EulerSampler.from_config(models.scheduler_config)
    timesteps = sampler.set_timesteps(20)            # float32: linspace timesteps are fractional
    x = x_T * sampler.init_noise_sigma
    for t in timesteps:
        x = sampler.step(unet(sampler.scale_model_input(x, t), t), t, x)
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from diffusion.samplers.sigmas import config_with_own_spacing, interpolate_sigmas, sigma_ve_table
from diffusion.schedule import NoiseSchedule, ScheduleConfig, predicted_x0_and_eps


class EulerSampler:
    """Stateful over one run: `set_timesteps` starts it, each `step` advances one noise level."""

    prediction_types = ("epsilon", "v_prediction", "sample")   # those diffusers' scheduler takes

    def __init__(self, *, schedule: NoiseSchedule):
        cfg = schedule.config
        if cfg.prediction_type not in self.prediction_types:
            raise ValueError(f"{type(self).__name__} supports prediction_type {' or '.join(self.prediction_types)}, "
                             f"not {cfg.prediction_type!r} (as diffusers' scheduler)")
        self.schedule = schedule
        self.sigmas_ve: torch.Tensor | None = None   # (steps + 1,) float32, descending, last 0
        self.timesteps: torch.Tensor | None = None   # (steps,) float32
        self.start = 0                               # the run's first step (image to image)
        self.step_index = 0

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | ScheduleConfig):
        """From a diffusers scheduler_config dict or a ScheduleConfig; a dict without `timestep_spacing`
        (SD v1's) gets "linspace", the Euler schedulers' own default, as diffusers gives it."""
        return cls(schedule=NoiseSchedule(config=config_with_own_spacing(scheduler_config, default_spacing="linspace")))

    def set_timesteps(self, num_steps: int, *, start: int = 0) -> torch.Tensor:
        """The `num_steps` timesteps of a schedule, (num_steps,) float32 descending, and their sigmas; returns
        those of the run: from step `start` on (image to image: diffusers' `get_timesteps` and
        `set_begin_index(start)`)."""
        cfg, T = self.schedule.config, self.schedule.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"number of sampling steps must be in 1..{T} (num_train_timesteps), got {num_steps}")
        # The spacings of Lin et al. 2024, Table 2; unlike DDIM's, "linspace" is not rounded to integers.
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].copy().astype(np.float32)
            ts += cfg.steps_offset
        else:  # "trailing"
            ts = np.arange(T, 0, -T / num_steps).round().copy().astype(np.float32)
            ts -= 1
        sigmas_ve = interpolate_sigmas(ts, sigma_ve_table(self.schedule))        # (steps,)
        self.sigmas_ve = torch.from_numpy(np.concatenate([sigmas_ve, [0.0]]).astype(np.float32))   # end on sigma 0
        self.timesteps = torch.from_numpy(ts)
        self.start = self.step_index = start
        return self.timesteps[start:]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """x0 noised to the sigma of the run's `step`-th model call, on this sampler's VE scale: x0 + sigma eps
        (as EulerDiscreteScheduler.add_noise)."""
        sigma = self.sigmas_ve.to(x0.device, x0.dtype)[self.start + step]
        return x0 + noise * sigma

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """x_T = N(0, I) * this. For "leading" spacing diffusers takes sqrt(sigma_max^2 + 1), the
        standard deviation of x_0 + sigma_max eps for unit-variance x_0; for the others sigma_max."""
        if self.sigmas_ve is None:
            raise RuntimeError(f"{type(self).__name__}.init_noise_sigma needs set_timesteps(num_steps) first")
        max_sigma = self.sigmas_ve.max()
        if self.schedule.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def _sigma_now(self, t: torch.Tensor | float) -> torch.Tensor:
        if self.sigmas_ve is None:
            raise RuntimeError(f"{type(self).__name__} used before set_timesteps(num_steps)")
        if self.step_index >= len(self.timesteps) or float(t) != float(self.timesteps[self.step_index]):
            raise RuntimeError(f"{type(self).__name__}: t={float(t)} is not the run's next timestep "
                               f"(step {self.step_index} of {len(self.timesteps)})")
        return self.sigmas_ve[self.step_index]

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the VE-scaled latents back on the VP scale the UNet was trained on
        (EDM Table 1, c_in for VP). Returns a new tensor."""
        sigma = self._sigma_now(t)
        return x / ((sigma ** 2 + 1) ** 0.5)

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma), the x_0 estimate, from what the UNet predicts; x is on the VE scale, x_0 + sigma eps."""
        x0_pred, _ = predicted_x0_and_eps(model_output, x, alpha_t=1, sigma_t=sigma,
                                          prediction_type=self.schedule.config.prediction_type)
        return x0_pred

    def step(self, model_output: torch.Tensor, t: torch.Tensor | float, x: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One Euler step sigma_i -> sigma_{i+1} (Algorithm 2, lines 7-8). Deterministic: `generator`
        is unused. model_output, x: (B, C, h, w); t: this step's entry of the timesteps."""
        sigma = self._sigma_now(t)
        x = x.to(torch.float32)
        x0_pred = self.denoised(model_output, x, sigma)
        derivative = (x - x0_pred) / sigma                        # d_i, EDM eq. 3
        dt = self.sigmas_ve[self.step_index + 1] - sigma             # sigma_{i+1} - sigma_i (< 0)
        x_next = x + derivative * dt
        self.step_index += 1
        return x_next.to(model_output.dtype)
