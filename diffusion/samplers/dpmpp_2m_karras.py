"""DPM-Solver++(2M) on Karras et al. 2022's noise levels ("DPM++ 2M Karras").

Equal to diffusers' `DPMSolverMultistepScheduler(use_karras_sigmas=True)` (tested per step). The
solver is `dpmpp_2m.py`'s; only the noise levels differ: instead of the table's sigma_ve (the VE noise
level of `sigmas.py`, Karras et al.'s sigma) at evenly spaced timesteps, N levels evenly spaced in
sigma_ve^(1/rho) between the table's ends (Karras et al. eq. 5, rho = 7, `sigmas.karras_sigmas`), which
puts more of the steps at low noise, where the details form. The UNet is called at each level's
timestep, found by interpolating t in log sigma_ve and rounded to an
integer (not rounded for the cosine schedule, then cut to an integer, as diffusers does). The
timestep spacing of the config plays no part.
"""
from __future__ import annotations

import numpy as np

from diffusion.samplers.dpmpp_2m import DPMSolverPP2MSampler
from diffusion.samplers.sigmas import karras_sigmas, sigma_ve_table, sigma_to_t


class DPMSolverPP2MKarrasSampler(DPMSolverPP2MSampler):
    """DPM-Solver++(2M) stepping through Karras et al.'s sigmas."""

    def sigmas_and_timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        table = sigma_ve_table(self.schedule)                            # (T,) ascending in t
        sigmas_ve = karras_sigmas(float(table[0]), float(table[-1]), num_steps)   # eq. 5, sigma_max -> sigma_min
        ts = sigma_to_t(sigmas_ve, np.log(table))
        if self.schedule.config.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        return sigmas_ve, ts.astype(np.int64)
