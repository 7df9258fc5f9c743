"""The noise schedule that every sampler (`diffusion/samplers/`) and the training loss share.

A diffusion model is trained on a fixed forward process (Ho et al. 2020, "DDPM"): a clean sample
x_0 is blended with Gaussian noise over `num_train_timesteps` steps,

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0,  (1 - alpha_bar_t) I )          (DDPM eq. 4)

where alpha_bar_t = prod_{s<=t} (1 - beta_s). Everything a sampler needs is this one table of
`alphas_cumprod` (alpha_bar_t), built from the betas of the scheduler's config, plus the choice of
which timesteps to visit when sampling with fewer steps than were trained (`timestep_spacing`).

The fields and defaults are those of diffusers' `scheduler_config.json`, so the config of a public
Stable Diffusion folder loads as is. SD v1's values are in `ScheduleConfig.sd_v1()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.configs import DIFFUSERS_METADATA, config_from_dict
from common.files import read_json

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys of a diffusers scheduler_config.json that select features this project does not implement,
# with the only value accepted. A config that switches one on is refused by name, rather than sampled
# differently from diffusers (common/configs.py: the policy every config is read by).
UNSUPPORTED_FIELDS = {"thresholding": False, "rescale_betas_zero_snr": False}
# Keys a scheduler_config.json may hold that change nothing here, beside diffusers' metadata:
# - `dynamic_thresholding_ratio`, `sample_max_value`: used only with thresholding (refused above);
# - the options of diffusers' scheduler classes (PNDM's `skip_prk_steps`, DPM-Solver's `solver_order`,
#   Euler's `use_karras_sigmas`, ...): a public folder's file is written for one class, but here the
#   sampler is chosen by name (`diffusion.samplers.make_sampler`), each with the options of the diffusers
#   scheduler it equals (`SAMPLERS`), as `OtherScheduler.from_config(config)` in diffusers keeps only
#   the keys the other class knows.
IGNORED_FIELDS = (
    "dynamic_thresholding_ratio", "sample_max_value", "skip_prk_steps", "variance_type", "interpolation_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type", "solver_order", "algorithm_type",
    "solver_type", "lower_order_final", "euler_at_final", "flow_shift", "lambda_min_clipped",
    "use_dynamic_shifting", "time_shift_type", "predict_x0", "disable_corrector", "solver_p", "shift_terminal",
    "original_inference_steps", "timestep_scaling",
)


@dataclass(kw_only=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000      # length T of the forward process the model was trained on
    beta_start: float = 0.0001           # beta_1
    beta_end: float = 0.02               # beta_T
    beta_schedule: str = "linear"        # how betas go from beta_start to beta_end, see `make_betas`
    trained_betas: tuple[float, ...] | None = None  # an explicit beta table; overrides the three above
    prediction_type: str = "epsilon"     # what the UNet predicts: the noise, v (Salimans & Ho 2022), or x_0
    timestep_spacing: str = "leading"    # which timesteps a short sampling run visits, see `inference_timesteps`
    steps_offset: int = 0                # added to every "leading" timestep (SD v1: 1)
    # alpha_bar used "after" the last step (t < 0): 1.0, or alpha_bar_0 of the table. diffusers'
    # defaults differ per scheduler (DDIM True, PNDM False), so None means "the sampler's default".
    set_alpha_to_one: bool | None = None
    clip_sample: bool = True             # DDIM only: clamp the predicted x_0 to [-range, range]
    clip_sample_range: float = 1.0

    @classmethod
    def sd_v1(cls) -> "ScheduleConfig":
        """The scheduler_config.json of runwayml/stable-diffusion-v1-5 and CompVis/stable-diffusion-v1-4."""
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                   set_alpha_to_one=False, clip_sample=False)

    @classmethod
    def from_json(cls, path: str | Path) -> "ScheduleConfig":
        """Read a diffusers `scheduler/scheduler_config.json`."""
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "scheduler config") -> "ScheduleConfig":
        """Read a diffusers scheduler_config.json dict (any diffusers scheduler's: PNDM's in SD v1).

        Options of the diffusers scheduler classes and diffusers' metadata are ignored (IGNORED_FIELDS
        says why); options that would change the numbers and are not implemented here, and any key
        not known, are refused by name.
        """
        cfg = config_from_dict(cls, config, fixed=UNSUPPORTED_FIELDS, ignored=DIFFUSERS_METADATA + IGNORED_FIELDS,
                               source=source)
        if cfg.beta_schedule not in BETA_SCHEDULES and cfg.trained_betas is None:
            raise ValueError(f"{source}: beta_schedule {cfg.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if cfg.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"{source}: timestep_spacing {cfg.timestep_spacing!r} is not one of "
                             f"{TIMESTEP_SPACINGS}")
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{source}: prediction_type {cfg.prediction_type!r} is not one of "
                             f"{PREDICTION_TYPES}")
        return cfg


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 ("Improved DDPM") eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    s = 0.008, and beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) clipped to max_beta (their 0.999)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """The (T,) float32 beta table of the forward process."""
    if cfg.trained_betas is not None:
        return torch.tensor(cfg.trained_betas, dtype=torch.float32)
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # DDPM (Ho et al. 2020, sec. 4): beta linear from 1e-4 to 0.02
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta), then squared
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(T)
    raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not one of {BETA_SCHEDULES}")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) with `ndim` dims in all, to broadcast one value over each sample."""
    return values.flatten().reshape(-1, *([1] * (ndim - 1)))


class NoiseSchedule:
    """The alpha_bar table of one scheduler config, and the forward process built on it."""

    def __init__(self, *, config: ScheduleConfig):
        self.config = config
        self.betas = make_betas(config)                           # (T,)
        self.alphas = 1.0 - self.betas                            # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)   # (T,) alpha_bar_t

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar_prev(self, prev_t: int, *, set_alpha_to_one: bool) -> torch.Tensor:
        """alpha_bar at the timestep a sampler steps to. Below 0 there is no table entry: the last
        step lands on 1.0 (a clean sample) or, as SD v1 configures it, on alpha_bar_0."""
        if prev_t >= 0:
            return self.alphas_cumprod[prev_t]
        return torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def inference_timesteps(self, num_steps: int) -> np.ndarray:
        """The `num_steps` timesteps a sampler visits, in descending order (int64).

        The three spacings are those of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample
        Steps are Flawed", Table 2). With T = 1000 and 50 steps:
        - leading:  0, 20, ..., 980, each + steps_offset (SD v1: 1, ..., 981)
        - trailing: 999, 979, ..., 19 (counted down from the end)
        - linspace: round(linspace(0, T - 1, num_steps))
        """
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"number of sampling steps must be in 1..{T} (num_train_timesteps), got {num_steps}")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + self.config.steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")
        return ts.astype(np.int64)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for a (B,) timestep tensor, shaped (B, 1, 1, 1)
        and in the dtype/device of `like`."""
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        a = alphas_cumprod[t.to(like.device)]                     # (B,)
        return _per_sample(a ** 0.5, like.ndim), _per_sample((1 - a) ** 0.5, like.ndim)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4, reparameterised).

        x0, noise: (B, C, H, W); t: (B,) integer timesteps. Returns a new tensor.
        """
        sqrt_a, sqrt_one_minus_a = self._coefficients(t, x0)
        return sqrt_a * x0 + sqrt_one_minus_a * noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
        (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D)."""
        sqrt_a, sqrt_one_minus_a = self._coefficients(t, x0)
        return sqrt_a * noise - sqrt_one_minus_a * x0


def predicted_x0_and_eps(model_output: torch.Tensor, x_t: torch.Tensor, *, alpha_t: torch.Tensor | float,
                         sigma_t: torch.Tensor | float, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the UNet predicts (`model_output`) -> the pair (x_0, eps) a sampler's update needs.

    All three follow from x_t = alpha_t x_0 + sigma_t eps. The DDIM, PLMS and DPM-Solver samplers keep
    x_t on the variance-preserving scale of DDPM eq. 4: alpha_t = sqrt(alpha_bar_t), sigma_t =
    sqrt(1 - alpha_bar_t) (DPM-Solver's alpha_t and sigma_t). The Euler samplers keep x on the
    variance-exploding scale of `samplers/sigmas.py`, x = x_0 + sigma_ve eps: alpha_t = 1, sigma_t = sigma_ve.
    - "epsilon": the UNet predicts eps; x_0 = (x_t - sigma_t eps) / alpha_t          (DDIM eq. 9)
    - "sample": it predicts x_0; eps = (x_t - alpha_t x_0) / sigma_t
    - "v_prediction": it predicts v = alpha eps - sigma x_0 on the variance-preserving scale
      (Salimans & Ho 2022, sec. 4 and appendix D; `NoiseSchedule.get_velocity`). With c = alpha_t^2 +
      sigma_t^2 (1 on that scale, 1 + sigma_ve^2 on the other), v = (alpha_t eps - sigma_t x_0) / sqrt(c), so
          x_0 = alpha_t x_t / c - sigma_t v / sqrt(c),   eps = sigma_t x_t / c + alpha_t v / sqrt(c)
    Each sampler passes its own alpha_t and sigma_t, computed as the diffusers scheduler it equals
    computes them, so that the numbers stay those of diffusers.
    """
    if prediction_type == "epsilon":
        return (x_t - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "v_prediction":
        c = alpha_t ** 2 + sigma_t ** 2
        return (alpha_t * x_t / c - sigma_t / c ** 0.5 * model_output,
                sigma_t * x_t / c + alpha_t / c ** 0.5 * model_output)
    if prediction_type == "sample":
        return model_output, (x_t - alpha_t * model_output) / sigma_t
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def randn(shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise drawn the way diffusers' `randn_tensor` draws it: on the generator's own device
    (a CPU generator draws on the CPU, then the tensor moves to `device`), so that one seed gives the
    same numbers whatever device runs the model."""
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
