"""Ancestral Euler sampling ("Euler a"): Karras et al. 2022's Euler step to a lower noise level,
followed by fresh noise back up to the next one, as Crowson's k-diffusion `sample_euler_ancestral`
(eta = 1) and diffusers' `EulerAncestralDiscreteScheduler` do (equal to the latter per step, the
noise included, when given the same generator).

From sigma_from to sigma_to, split the target variance sigma_to^2 into a deterministic part
sigma_down^2 and a fresh-noise part sigma_up^2, with sigma_up chosen as a DDPM ancestral step
(Ho et al. 2020's posterior variance, written in sigma):

    sigma_up   = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)
    sigma_down = sqrt(sigma_to^2 - sigma_up^2)
    x' = x + (sigma_down - sigma_from) d,   d = (x - D(x; sigma_from)) / sigma_from      (Euler, EDM eq. 3)
    x_next = x' + sigma_up z,   z ~ N(0, I)

The noise z is one `torch.randn` of model_output's shape from the run's generator per step (the last
step too, where sigma_up = 0), exactly as diffusers draws it, so a seed gives diffusers' image.
The schedule, input scaling and starting noise are Euler's (`euler.py`).
"""
from __future__ import annotations

import torch

from diffusion.samplers.euler import EulerSampler
from diffusion.schedule import randn


class EulerAncestralSampler(EulerSampler):
    """Euler's timesteps and sigmas; a stochastic step."""

    prediction_types = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"

    def step(self, model_output: torch.Tensor, t: torch.Tensor | float, x: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One ancestral step sigma_from -> sigma_to; the noise comes from `generator` (on its device)."""
        sigma = self._sigma_now(t)
        x = x.to(torch.float32)
        x0_pred = self.denoised(model_output, x, sigma)
        sigma_from, sigma_to = sigma, self.sigmas_ve[self.step_index + 1]
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        derivative = (x - x0_pred) / sigma                       # d, EDM eq. 3
        x_next = x + derivative * (sigma_down - sigma)           # the Euler step down to sigma_down
        z = randn(tuple(model_output.shape), generator=generator, device=model_output.device,
                  dtype=model_output.dtype)
        x_next = x_next + z * sigma_up                           # fresh noise back up to sigma_to
        self.step_index += 1
        return x_next.to(model_output.dtype)
