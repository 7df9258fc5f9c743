"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

Numerically equal to diffusers' `DDIMScheduler` under the same scheduler_config (tested per step
against stored reference latents). Notation: alpha_bar_t is the paper's alpha_t (the cumulative
product, `NoiseSchedule.alphas_cumprod`), t -> t_prev is one sampling step of a run with fewer steps
than training had, and the paper's sigma_t, the noise an eta > 0 step adds, is written sigma_eta here
(it is not the forward process's sqrt(1 - alpha_bar_t)).

    x_{t_prev} = sqrt(alpha_bar_prev) * x0_pred                                 "predicted x_0"
               + sqrt(1 - alpha_bar_prev - sigma_eta^2) * eps_pred              "direction pointing to x_t"
               + sigma_eta * z,  z ~ N(0, I)                                    "random noise"
                                                                                       (DDIM eq. 12)
    sigma_eta = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)
                                                                                       (DDIM eq. 16)
eta = 0 is the deterministic DDIM sampler; eta = 1 is DDPM's ancestral sampler on the same steps.
x0_pred and eps_pred come from what the UNet predicts (eps, v or x_0) by `predicted_x0_and_eps`
(diffusion/schedule.py), the conversion every sampler shares.

Usage (eta is fixed when the sampler is made, so the loop is the same for every sampler):
    sampler = DDIMSampler.from_config(models.scheduler_config, eta=0.0)
    for t in sampler.set_timesteps(50):
        x = sampler.step(unet(sampler.scale_model_input(x, t), t), t, x, generator=g)
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from diffusion.schedule import NoiseSchedule, ScheduleConfig, predicted_x0_and_eps, randn


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM steps over a shared `NoiseSchedule`."""

    init_noise_sigma = 1.0  # the starting latents are plain N(0, I): DDIM needs no rescaling of x_T

    def __init__(self, *, schedule: NoiseSchedule, eta: float = 0.0):
        if not eta >= 0:  # also refuses NaN
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule = schedule
        self.eta = eta
        cfg = schedule.config
        # diffusers' DDIMScheduler default for set_alpha_to_one is True; SD v1 sets it false.
        self.set_alpha_to_one = True if cfg.set_alpha_to_one is None else cfg.set_alpha_to_one
        self.num_steps: int | None = None
        self.timesteps: torch.Tensor | None = None   # (num_steps,) the whole schedule, from x_T
        self.start = 0                               # the run's first step in it (image to image)

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | ScheduleConfig, *, eta: float = 0.0) -> "DDIMSampler":
        """From a diffusers scheduler_config dict (DDIMScheduler's or PNDMScheduler's) or a ScheduleConfig."""
        cfg = scheduler_config if isinstance(scheduler_config, ScheduleConfig) \
            else ScheduleConfig.from_dict(scheduler_config)
        return cls(schedule=NoiseSchedule(config=cfg), eta=eta)

    def set_timesteps(self, num_steps: int, *, start: int = 0) -> torch.Tensor:
        """Choose the `num_steps` timesteps of a schedule; returns those of the run, descending, as an int64
        tensor: all of them, or from step `start` on (image to image: diffusers' `get_timesteps`)."""
        self.num_steps = num_steps
        self.timesteps = torch.from_numpy(self.schedule.inference_timesteps(num_steps).copy())
        self.start = start
        return self.timesteps[start:]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """x0 noised to the timestep of the run's `step`-th model call (DDPM eq. 4), as DDIMScheduler.add_noise."""
        t = self.timesteps[self.start + step]
        return self.schedule.add_noise(x0, noise, t.expand(x0.shape[0]))

    def scale_model_input(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """DDIM feeds the UNet x_t as it is."""
        return x_t

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step x_t -> x_{t_prev} (DDIM eq. 12). model_output, x_t: (B, C, h, w); t: this step's timestep.

        With eta > 0 the noise z is drawn exactly as diffusers draws it: one `torch.randn` of
        model_output's shape and dtype, from `generator` (on the generator's device), after nothing
        else has been drawn in this step. With eta = 0 nothing is drawn.
        """
        if self.num_steps is None:
            raise RuntimeError("DDIMSampler.step called before set_timesteps(num_steps)")
        eta = self.eta
        cfg = self.schedule.config
        t = int(t)
        # The previous timestep is one stride of T // num_steps back, for every spacing (as diffusers does).
        prev_t = t - self.schedule.num_train_timesteps // self.num_steps
        alpha_bar_t = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alpha_bar_prev(prev_t, set_alpha_to_one=self.set_alpha_to_one)

        # "predicted x_0" (eq. 12, first bracket; eq. 9) and the noise estimate eps_theta(x_t), on the
        # forward process's scale x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        x0_pred, eps_pred = predicted_x0_and_eps(model_output, x_t, alpha_t=alpha_bar_t ** 0.5,
                                                 sigma_t=(1 - alpha_bar_t) ** 0.5, prediction_type=cfg.prediction_type)
        if cfg.clip_sample:  # off for SD v1; pixel-space models clamp x_0 to the data range
            x0_pred = x0_pred.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

        # sigma_eta, DDIM eq. 16: eta * sqrt((1 - a_prev)/(1 - a_t)) * sqrt(1 - a_t/a_prev)
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_eta = eta * variance ** 0.5

        # "direction pointing to x_t" (eq. 12, second term)
        direction = (1 - alpha_bar_prev - sigma_eta ** 2) ** 0.5 * eps_pred
        # eq. 12 without its random term
        x_prev = alpha_bar_prev ** 0.5 * x0_pred + direction
        if eta > 0:
            # "random noise" sigma_eta * z (eq. 12, third term)
            z = randn(tuple(model_output.shape), generator=generator, device=model_output.device,
                      dtype=model_output.dtype)
            x_prev = x_prev + sigma_eta * z
        return x_prev
