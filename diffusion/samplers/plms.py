"""PLMS sampling: the pseudo linear multi-step method of Liu et al. 2022 ("Pseudo Numerical Methods
for Diffusion Models on Manifolds", PNDM), in the variant CompVis's `PLMSSampler` uses.

Numerically equal to diffusers' `PNDMScheduler(skip_prk_steps=True)`, the scheduler named by the
public SD v1 folders (tested per step against stored reference latents). It shares the noise
schedule (`diffusion/schedule.py`) with DDIM.

Two pieces:
1. The transfer part phi (PNDM eq. 9): a deterministic step x_t -> x_{t_prev} given a noise estimate
   e; with the model's own eps it is exactly a DDIM (eta = 0) step, written differently:
       x_prev = sqrt(a_prev / a_t) x_t
                - (a_prev - a_t) / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)) * e
   (a = alpha_bar).
2. The gradient part: instead of the latest eps, phi is fed a linear combination of the last four
   noise estimates, the 4th-order Adams-Bashforth weights (PNDM eq. 12, "pseudo linear multi-step"):
       e' = (55 e_t - 59 e_{t+1} + 37 e_{t+2} - 9 e_{t+3}) / 24

With fewer than four past estimates the method warms up (as crowsonkb's PLMS for CompVis, which
diffusers follows with skip_prk_steps instead of PNDM's Runge-Kutta start):
- first step: phi with e_0 alone (an Euler step), keeping x_T;
- second model call, at the SAME timestep t_1 the first step landed on, redoes the first step
  from x_T with the average (e_0 + e_1)/2 (a pseudo improved-Euler / Heun step);
  this is why the timestep list repeats its second entry and has num_steps + 1 entries;
- then 2nd-order (3 e_t - e_{t+1})/2, 3rd-order (23 e_t - 16 e_{t+1} + 5 e_{t+2})/12,
  and from then on the 4th-order formula above.
The e's are the model's outputs as they come: a v-predicting model's v's are combined the same way and
the combination turned into a noise estimate inside phi (`predicted_x0_and_eps`, diffusion/schedule.py),
as diffusers does.

Usage (one model call per entry of the timestep list):
    sampler = PLMSSampler.from_config(models.scheduler_config)
    for t in sampler.set_timesteps(50):        # 51 entries
        x = sampler.step(unet(sampler.scale_model_input(x, t), t), t, x)
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from diffusion.schedule import NoiseSchedule, ScheduleConfig, predicted_x0_and_eps


class PLMSSampler:
    """Stateful over one sampling run: `set_timesteps` starts a run and clears the history."""

    init_noise_sigma = 1.0  # the starting latents are plain N(0, I)

    def __init__(self, *, schedule: NoiseSchedule):
        cfg = schedule.config
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"PLMS supports prediction_type epsilon or v_prediction, not {cfg.prediction_type!r}")
        self.schedule = schedule
        # diffusers' PNDMScheduler default for set_alpha_to_one is False (SD v1 also sets it false).
        self.set_alpha_to_one = False if cfg.set_alpha_to_one is None else cfg.set_alpha_to_one
        self.num_steps: int | None = None
        self.timesteps: torch.Tensor | None = None   # the model-call timesteps of the whole schedule
        self.start = 0                               # the run's first call among them (image to image)
        self.output_history: list[torch.Tensor] = []   # the last (up to 4) model outputs (eps, or v), oldest first
        self.x_first: torch.Tensor | None = None     # x_T, kept for the improved-Euler redo of step 1
        self.counter = 0                             # model calls so far in this run

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | ScheduleConfig) -> "PLMSSampler":
        """From a diffusers scheduler_config dict (PNDMScheduler's or DDIMScheduler's) or a ScheduleConfig."""
        cfg = scheduler_config if isinstance(scheduler_config, ScheduleConfig) \
            else ScheduleConfig.from_dict(scheduler_config)
        return cls(schedule=NoiseSchedule(config=cfg))

    def set_timesteps(self, num_steps: int, *, start: int = 0) -> torch.Tensor:
        """The model-call timesteps of a `num_steps` run: (num_steps + 1,) int64 for num_steps >= 2,
        descending, with the second one repeated (e.g. 981, 961, 961, 941, ..., 1 for SD v1 and 50).
        `start`: the run begins at that call (image to image, diffusers' `get_timesteps`: PNDM's order is 1,
        so the call list itself is cut); the warm-up then starts there, as PNDMScheduler's counter does."""
        ts = self.schedule.inference_timesteps(num_steps)[::-1]       # ascending
        calls = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]    # repeat the second-largest
        self.num_steps = num_steps
        self.timesteps = torch.from_numpy(calls.astype(np.int64).copy())
        self.start = start
        self.output_history, self.x_first, self.counter = [], None, 0
        return self.timesteps[start:]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """x0 noised to the timestep of the run's `step`-th model call (DDPM eq. 4), as PNDMScheduler.add_noise."""
        t = self.timesteps[self.start + step]
        return self.schedule.add_noise(x0, noise, t.expand(x0.shape[0]))

    def transfer(self, x_t: torch.Tensor, t: int, prev_t: int, model_output: torch.Tensor) -> torch.Tensor:
        """phi(x_t, e, t, t_prev), PNDM eq. 9. `model_output` is the (combined) estimate; a v-prediction
        is turned into the noise estimate e here, after the combination, as diffusers does."""
        alpha_bar_t = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alpha_bar_prev(prev_t, set_alpha_to_one=self.set_alpha_to_one)
        beta_bar_t, beta_bar_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
        _, e = predicted_x0_and_eps(model_output, x_t, alpha_t=alpha_bar_t ** 0.5, sigma_t=beta_bar_t ** 0.5,
                                    prediction_type=self.schedule.config.prediction_type)
        # coefficient of x_t: 1 + (a_prev - a_t) / (sqrt(a_t) (sqrt(a_prev) + sqrt(a_t))) = sqrt(a_prev / a_t)
        x_coeff = (alpha_bar_prev / alpha_bar_t) ** 0.5
        # denominator of e in eq. 9: sqrt(a_t) (sqrt((1 - a_prev) a_t) + sqrt((1 - a_t) a_prev))
        e_denominator = alpha_bar_t * beta_bar_prev ** 0.5 + (alpha_bar_t * beta_bar_t * alpha_bar_prev) ** 0.5
        return x_coeff * x_t - (alpha_bar_prev - alpha_bar_t) * e / e_denominator

    def scale_model_input(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """PLMS feeds the UNet x_t as it is."""
        return x_t

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One model call's update; returns the next latents. model_output, x_t: (B, C, h, w).

        PLMS is deterministic: it takes no eta and draws no noise (`generator` is unused).
        """
        if self.num_steps is None:
            raise RuntimeError("PLMSSampler.step called before set_timesteps(num_steps)")
        t = int(t)
        stride = self.schedule.num_train_timesteps // self.num_steps
        prev_t = t - stride
        if self.counter == 1:
            # The repeated timestep: redo step 1 (t_0 -> t_1) from x_T; this call's eps is at t_1
            # and is averaged with e_0 but not kept in the history.
            prev_t, t = t, t + stride
        else:
            self.output_history = self.output_history[-3:] + [model_output]
        e = self.output_history

        if len(e) == 1 and self.counter == 0:        # Euler step with e_0; remember x_T
            combined = model_output
            self.x_first = x_t
        elif len(e) == 1 and self.counter == 1:      # pseudo improved Euler: (e_0 + e_1) / 2 from x_T
            combined = (model_output + e[-1]) / 2
            x_t, self.x_first = self.x_first, None
        elif len(e) == 2:                            # 2nd-order Adams-Bashforth
            combined = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:                            # 3rd-order Adams-Bashforth
            combined = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:                                        # 4th order, PNDM eq. 12
            combined = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])

        x_prev = self.transfer(x_t, t, prev_t, combined)
        self.counter += 1
        return x_prev
