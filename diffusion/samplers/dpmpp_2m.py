"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", the multistep second-order solver in data-prediction form (the paper's
Algorithm 2, DPM-Solver++(2M)).

Numerically equal to diffusers' `DPMSolverMultistepScheduler` with its defaults (algorithm_type
"dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final, final_sigmas_type "zero";
tested per step against stored reference latents).

Notation, the paper's: x_t = alpha_t x_0 + sigma_t eps on the variance-preserving scale, alpha_t =
sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), so sigma_t in this file is the VP sigma. The run's
noise levels are kept, as diffusers keeps them, as the VE sigma_ve = sigma_t / alpha_t of `sigmas.py`
(`sigmas_ve`); `vp_alpha_sigma` turns one into (alpha_t, sigma_t): alpha_t = 1 / sqrt(sigma_ve^2 + 1),
sigma_t = sigma_ve alpha_t. lambda_t = log(alpha_t / sigma_t) is the half log-SNR, and x_theta(x_t, t) the
model's data (x_0) prediction, from whatever the UNet predicts (`predicted_x0_and_eps`, diffusion/schedule.py).

- First order (the paper's first-order DPM-Solver++, which it notes is the DDIM step):
      x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta(x_s, s),    h = lambda_t - lambda_s
- Second order, multistep (Algorithm 2), reusing the previous step's x_theta:
      r = h_prev / h
      D = (1 + 1/(2r)) x_theta(t_{i-1}) - 1/(2r) x_theta(t_{i-2})
      x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h} - 1) D
  written, as diffusers does, with D0 = x_theta(t_{i-1}), D1 = (D0 - x_theta(t_{i-2})) / r and
  D = D0 + D1 / 2.
The first step has no history (first order), and the last one is first order too ("lower_order_final";
with final sigma 0 diffusers always does so): it lands on sigma 0, where x is x_theta itself.

The UNet's input is not rescaled (init_noise_sigma 1, `scale_model_input` the identity).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from diffusion.samplers.sigmas import config_with_own_spacing, interpolate_sigmas, sigma_ve_table
from diffusion.schedule import NoiseSchedule, ScheduleConfig, predicted_x0_and_eps


class DPMSolverPP2MSampler:
    """Stateful over one run: `set_timesteps` starts it and clears the x_theta history."""

    init_noise_sigma = 1.0   # the starting latents are plain N(0, I) (VP form)

    def __init__(self, *, schedule: NoiseSchedule):
        self.schedule = schedule
        self.sigmas_ve: torch.Tensor | None = None   # (steps + 1,) float32 VE noise levels, last 0
        self.timesteps: torch.Tensor | None = None   # (steps,) int64
        self.start = 0                               # the run's first step (image to image)
        self.step_index = 0
        self.x0_history: list[torch.Tensor] = []     # x_theta of the previous step (at most one kept)

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | ScheduleConfig):
        """From a diffusers scheduler_config dict or a ScheduleConfig; a dict without `timestep_spacing`
        (SD v1's) gets "linspace", DPMSolverMultistepScheduler's own default, as diffusers gives it."""
        return cls(schedule=NoiseSchedule(config=config_with_own_spacing(scheduler_config, default_spacing="linspace")))

    def spaced_timesteps(self, num_steps: int) -> np.ndarray:
        """DPMSolverMultistepScheduler's spacings: num_steps + 1 points, the last (t = 0) dropped."""
        cfg, T = self.schedule.config, self.schedule.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if cfg.timestep_spacing == "leading":
            step_ratio = T // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + cfg.steps_offset
        ts = np.arange(T, 0, -T / num_steps).round().copy().astype(np.int64)   # "trailing"
        return ts - 1

    def sigmas_and_timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The VE noise levels of the run (without the final 0) and the UNet timesteps at them."""
        ts = self.spaced_timesteps(num_steps)
        return interpolate_sigmas(ts, sigma_ve_table(self.schedule)), ts

    def set_timesteps(self, num_steps: int, *, start: int = 0) -> torch.Tensor:
        """The timesteps of a `num_steps` schedule, (num_steps,) int64 descending; returns those of the run:
        from step `start` on (image to image: diffusers' `get_timesteps` and `set_begin_index(start)`; the
        run's first step is then first order, having no history)."""
        T = self.schedule.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"number of sampling steps must be in 1..{T} (num_train_timesteps), got {num_steps}")
        sigmas_ve, ts = self.sigmas_and_timesteps(num_steps)
        self.sigmas_ve = torch.from_numpy(np.concatenate([sigmas_ve, [0.0]]).astype(np.float32))   # end on sigma 0
        self.timesteps = torch.from_numpy(ts).to(torch.int64)
        self.start = self.step_index = start
        self.x0_history = []
        return self.timesteps[start:]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """x0 noised to the noise level of the run's `step`-th model call, alpha_t x0 + sigma_t eps (VP form),
        as DPMSolverMultistepScheduler.add_noise."""
        alpha_t, sigma_t = self.vp_alpha_sigma(self.sigmas_ve.to(x0.device, x0.dtype)[self.start + step])
        return alpha_t * x0 + sigma_t * noise

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """DPM-Solver feeds the UNet x_t as it is (VP form)."""
        return x

    @staticmethod
    def vp_alpha_sigma(sigma_ve: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VE noise level -> (alpha_t, sigma_t) of the VP form: alpha_t = 1/sqrt(sigma_ve^2 + 1), sigma_t = sigma_ve alpha_t."""
        alpha_t = 1 / ((sigma_ve ** 2 + 1) ** 0.5)
        return alpha_t, sigma_ve * alpha_t

    def step(self, model_output: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step t_{i-1} -> t_i; deterministic (`generator` is unused). model_output, x: (B, C, h, w)."""
        if self.sigmas_ve is None:
            raise RuntimeError(f"{type(self).__name__}.step called before set_timesteps(num_steps)")
        i = self.step_index
        if i >= len(self.timesteps) or int(t) != int(self.timesteps[i]):
            raise RuntimeError(f"{type(self).__name__}: t={t} is not the run's next timestep "
                               f"(step {i} of {len(self.timesteps)})")
        alpha_t, sigma_t = self.vp_alpha_sigma(self.sigmas_ve[i + 1])     # where we land
        alpha_s0, sigma_s0 = self.vp_alpha_sigma(self.sigmas_ve[i])       # where we are
        x0, _ = predicted_x0_and_eps(model_output, x, alpha_t=alpha_s0, sigma_t=sigma_s0,   # x_theta(x_s0, s0)
                                     prediction_type=self.schedule.config.prediction_type)
        self.x0_history = self.x0_history[-1:] + [x0]
        x = x.to(torch.float32)

        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)          # +inf on the final sigma 0
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        last = i == len(self.timesteps) - 1
        if len(self.x0_history) < 2 or last:
            # first order: (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta
            x_next = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            # DPM-Solver++(2M), Algorithm 2: the previous step's x_theta gives the second-order term
            alpha_s1, sigma_s1 = self.vp_alpha_sigma(self.sigmas_ve[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            m0, m1 = self.x0_history[-1], self.x0_history[-2]
            r0 = (lambda_s0 - lambda_s1) / h                         # r_i = h_{i-1} / h_i
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            x_next = ((sigma_t / sigma_s0) * x
                      - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                      - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        self.step_index += 1
        return x_next.to(model_output.dtype)
