"""DDIM and PLMS against diffusers' DDIMScheduler / PNDMScheduler(skip_prk_steps=True), step by step.

The fixtures (tools/make_reference_sampling.py) hold, per case, the starting latents, a fixed model
output for every model call, and diffusers' latents after every step. We replay the same model outputs
through our samplers and compare every step's latents (max |diff| <= 1e-5).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.plms import PLMSSampler
from diffusion.schedule import NoiseSchedule, ScheduleConfig

FIXTURES = Path(__file__).parent / "fixtures" / "sampling"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    meta = json.loads((FIXTURES / "schedulers.json").read_text())
    return meta, load_file(str(FIXTURES / "schedulers.safetensors"))


def _cases():
    meta = json.loads((FIXTURES / "schedulers.json").read_text())
    return [pytest.param(c, id=c["name"]) for c in meta["cases"]]


@pytest.mark.parametrize("case", _cases())
def test_per_step_latents_equal_diffusers(case, reference):
    _, tensors = reference
    name = case["name"]
    cls = DDIMSampler if case["sampler"] == "ddim" else PLMSSampler
    sampler = cls.from_config(case["scheduler_config"])
    timesteps = sampler.set_timesteps(case["steps"])
    assert timesteps.tolist() == case["timesteps"]
    generator = torch.Generator().manual_seed(case["noise_seed"]) if case["noise_seed"] is not None else None
    x = tensors[f"{name}.x_T"]
    x_T = x.clone()
    for i, t in enumerate(timesteps):
        model_output = tensors[f"{name}.model_output.{i}"]
        if case["sampler"] == "ddim":
            x = sampler.step(model_output, int(t), x, eta=case["eta"], generator=generator)
        else:
            x = sampler.step(model_output, int(t), x)
        diff = (x - tensors[f"{name}.x.{i}"]).abs().max().item()
        assert diff <= TOL, f"{name}: step {i} (t={int(t)}) max |diff| {diff:.3g} > {TOL}"
    assert torch.equal(tensors[f"{name}.x_T"], x_T), "the caller's latents were modified in place"


def test_plms_restarts_cleanly(reference):
    """A second run on the same sampler object gives the same latents (history cleared by set_timesteps)."""
    meta, tensors = reference
    case = next(c for c in meta["cases"] if c["name"] == "plms_sd_4")
    sampler = PLMSSampler.from_config(case["scheduler_config"])
    for _ in range(2):
        x = tensors["plms_sd_4.x_T"]
        for i, t in enumerate(sampler.set_timesteps(4)):
            x = sampler.step(tensors[f"plms_sd_4.model_output.{i}"], int(t), x)
        assert (x - tensors["plms_sd_4.x.4"]).abs().max().item() <= TOL


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_forward_process_equals_diffusers(beta_schedule, reference):
    meta, tensors = reference
    config = next(f for f in meta["forward"] if f["beta_schedule"] == beta_schedule)["scheduler_config"]
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(config))
    ref_alphas = tensors[f"{beta_schedule}.alphas_cumprod"]
    assert (schedule.alphas_cumprod - ref_alphas).abs().max().item() <= 1e-7
    x0, noise, t = tensors["forward.x0"], tensors["forward.noise"], tensors["forward.t"]
    for what, ours in (("add_noise", schedule.add_noise(x0, noise, t)),
                       ("get_velocity", schedule.get_velocity(x0, noise, t))):
        diff = (ours - tensors[f"{beta_schedule}.{what}"]).abs().max().item()
        assert diff <= TOL, f"{beta_schedule} {what}: max |diff| {diff:.3g}"


def test_sd_v1_preset_matches_its_config_dict():
    sd = ScheduleConfig.sd_v1()
    from_json = ScheduleConfig.from_dict({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False})
    assert sd == from_json
    # the tiny fixture folder's scheduler_config.json (a DDIMScheduler saved by diffusers) says the same
    assert ScheduleConfig.from_json(FIXTURES.parent / "sd" / "tiny_diffusers" / "scheduler" / "scheduler_config.json") == sd
    assert DDIMSampler.from_config(sd).set_timesteps(50)[:3].tolist() == [981, 961, 941]
    assert PLMSSampler.from_config(sd).set_timesteps(50)[:4].tolist() == [981, 961, 961, 941]


@pytest.mark.parametrize("bad, message", [
    ({"beta_schedule": "quadratic"}, "beta_schedule"),
    ({"timestep_spacing": "middle"}, "timestep_spacing"),
    ({"prediction_type": "score"}, "prediction_type"),
    ({"thresholding": True}, "thresholding"),
])
def test_bad_scheduler_config_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig.from_dict(bad)


def test_bad_step_counts_and_eta():
    sampler = DDIMSampler.from_config(ScheduleConfig.sd_v1())
    with pytest.raises(ValueError, match="sampling steps"):
        sampler.set_timesteps(0)
    with pytest.raises(ValueError, match="sampling steps"):
        sampler.set_timesteps(1001)
    sampler.set_timesteps(5)
    with pytest.raises(ValueError, match="eta"):
        sampler.step(torch.zeros(1, 4, 2, 2), 801, torch.zeros(1, 4, 2, 2), eta=-0.1)
    with pytest.raises(ValueError, match="PLMS"):
        PLMSSampler.from_config({"prediction_type": "sample"})
