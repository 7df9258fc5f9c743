"""The sigma view of the noise schedule, shared by the Euler and DPM-Solver samplers.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM) write
the variance-preserving forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps (DDPM eq. 4, a = alpha_bar_t)
in variance-exploding form: divide by sqrt(a) and

    x_t / sqrt(a) = x_0 + sigma_ve eps,     sigma_ve = sqrt((1 - a) / a)          (EDM Table 1, "VP")

so a sampler can step in sigma_ve, the noise level, instead of in t. For SD v1 sigma_ve runs from 0.029
(t = 0) to 14.6 (t = 999). The UNet still wants t and the VP-scaled input; `sigma_to_t` maps back.

Two sigmas meet in these samplers: this VE noise level, which EDM and k-diffusion call sigma and which
the code calls sigma_ve (`sigmas_ve` of a run), and the VP sigma_t = sqrt(1 - a) of DDPM and DPM-Solver
(sigma_t = sigma_ve / sqrt(sigma_ve^2 + 1)). Every "sigma" in this file and in `euler.py` / `euler_a.py`
is the VE one.

The numbers follow diffusers' schedulers operation for operation (float32 table, float64 numpy
interpolation, float32 result), so that the samplers equal them to the last bit or nearly.
"""
from __future__ import annotations

from typing import Any, Mapping

import dataclasses

import numpy as np

from diffusion.schedule import NoiseSchedule, ScheduleConfig


def config_with_own_spacing(scheduler_config: Mapping[str, Any] | ScheduleConfig, *,
                            default_spacing: str) -> ScheduleConfig:
    """The ScheduleConfig a sampler runs on, with diffusers' rule for a missing `timestep_spacing`.

    diffusers builds a scheduler from another's config (`EulerDiscreteScheduler.from_config(pipe.
    scheduler.config)`) keeping only the keys the file actually held: a key the file left out takes
    the NEW scheduler's default. SD v1's public scheduler_config.json (PNDMScheduler, diffusers 0.6.0)
    has no `timestep_spacing`, so PNDM and DDIM run on "leading" but the Euler and DPM-Solver schedulers
    on their own default, "linspace". A file that names a spacing (as diffusers >= 0.15 saves it) keeps it.
    A ScheduleConfig object is taken as given.
    """
    if isinstance(scheduler_config, ScheduleConfig):
        return scheduler_config
    cfg = ScheduleConfig.from_dict(scheduler_config)
    if "timestep_spacing" not in scheduler_config:
        cfg = dataclasses.replace(cfg, timestep_spacing=default_spacing)
    return cfg


def sigma_ve_table(schedule: NoiseSchedule) -> np.ndarray:
    """(T,) float32 sigma_ve = sqrt((1 - alpha_bar_t) / alpha_bar_t), t = 0 .. T-1 (ascending)."""
    a = schedule.alphas_cumprod
    return (((1 - a) / a) ** 0.5).numpy()


def interpolate_sigmas(timesteps: np.ndarray, table: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps: linear interpolation in the table (float64)."""
    return np.interp(timesteps, np.arange(0, len(table)), table)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: num_steps noise levels from sigma_max down to sigma_min,
        sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    evenly spaced in sigma^(1/rho); rho = 7 (the paper's choice) spends more steps at low noise."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """The (fractional) timesteps of noise levels `sigmas`: linear interpolation of t in log sigma
    between the two table entries around each (as k-diffusion's and diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))                        # (N,)
    dists = log_sigma[None, :] - log_table[:, None]                      # (T, N)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)  # (N,)
    high = low + 1
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[high]), 0, 1)
    return (1 - w) * low + w * high
