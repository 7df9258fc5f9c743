"""Every sampler against its diffusers scheduler, step by step: DDIM (DDIMScheduler), PLMS
(PNDMScheduler(skip_prk_steps=True)), dpmpp_2m and dpmpp_2m_karras (DPMSolverMultistepScheduler without
and with use_karras_sigmas), euler (EulerDiscreteScheduler), euler_a (EulerAncestralDiscreteScheduler).

The fixtures (tools/make_reference_sampling.py) hold, per case, the starting latents, a fixed model
output for every model call, and diffusers' latents after every step (and the Euler family's scaled
UNet input). We replay the same model outputs through our samplers and compare every step's latents
(max |diff| <= 1e-5).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.samplers import SAMPLERS, make_sampler
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
    sampler = make_sampler(case["scheduler_config"], case["sampler"], eta=case["eta"] if case["sampler"] == "ddim" else None)
    timesteps = sampler.set_timesteps(case["steps"])
    assert timesteps.tolist() == case["timesteps"]
    generator = torch.Generator().manual_seed(case["noise_seed"]) if case["noise_seed"] is not None else None
    stacked = f"{name}.xs" in tensors   # the newer cases store (steps, ...) stacks
    x_T = tensors[f"{name}.x_T"]
    x_T_before = x_T.clone()
    x = x_T * sampler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_output = tensors[f"{name}.model_outputs"][i] if stacked else tensors[f"{name}.model_output.{i}"]
        scaled = sampler.scale_model_input(x, t)
        if f"{name}.scaled_inputs" in tensors:
            diff = (scaled - tensors[f"{name}.scaled_inputs"][i]).abs().max().item()
            assert diff <= TOL, f"{name}: step {i} (t={float(t)}) UNet input max |diff| {diff:.3g} > {TOL}"
        else:
            assert torch.equal(scaled, x), f"{name}: this sampler feeds the UNet x_t unscaled"
        x = sampler.step(model_output, t, x, generator=generator)
        expected = tensors[f"{name}.xs"][i] if stacked else tensors[f"{name}.x.{i}"]
        diff = (x - expected).abs().max().item()
        assert diff <= TOL, f"{name}: step {i} (t={float(t)}) max |diff| {diff:.3g} > {TOL}"
    assert torch.equal(x_T, x_T_before), "the caller's latents were modified in place"


def test_every_sampler_has_reference_cases(reference):
    """1, 2, 3 and 25 steps on SD v1's own config, for every sampler with a sigma schedule."""
    meta, _ = reference
    for name in ("dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a"):
        steps = {c["steps"] for c in meta["cases"] if c["sampler"] == name and c["name"].startswith(f"{name}_sd_")}
        assert steps == {1, 2, 3, 25}, name
    assert {c["sampler"] for c in meta["cases"]} == set(SAMPLERS)


def test_sd_v1_config_without_spacing_runs_linspace_for_the_sigma_samplers(reference):
    """SD v1's public scheduler_config.json names no timestep_spacing: DDIM/PLMS take "leading" (their
    default), DPM-Solver and Euler "linspace" (theirs), as diffusers' from_config gives them."""
    meta, _ = reference
    for case in meta["cases"]:
        if case["name"].endswith(("_sd_25",)):
            assert "timestep_spacing" not in case["scheduler_config"]
            assert case["diffusers_timestep_spacing"] == "linspace"
            assert make_sampler(case["scheduler_config"], case["sampler"]).schedule.config.timestep_spacing == "linspace"
    hub = next(c for c in meta["cases"] if c["name"] == "euler_sd_25")["scheduler_config"]
    assert make_sampler(hub, "ddim").set_timesteps(25)[:2].tolist() == [961, 921]   # leading + steps_offset
    assert make_sampler(hub, "euler").set_timesteps(25)[0].item() == 999.0          # linspace


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
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler.from_config(ScheduleConfig.sd_v1(), eta=-0.1)
    with pytest.raises(ValueError, match="PLMS"):
        PLMSSampler.from_config({"prediction_type": "sample"})


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a"])
def test_new_samplers_refuse_bad_step_counts(name):
    """diffusers takes 1 step for all of these (DPM-Solver falls back to first order); 0 steps or more
    steps than training had are refused with the range."""
    sampler = make_sampler(ScheduleConfig.sd_v1(), name)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"sampling steps must be in 1\.\.1000"):
            sampler.set_timesteps(bad)
    assert len(sampler.set_timesteps(1)) == 1


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(ValueError, match="ddim, plms, dpmpp_2m, dpmpp_2m_karras, euler, euler_a"):
        make_sampler(ScheduleConfig.sd_v1(), "heun")


@pytest.mark.parametrize("name", ["plms", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a"])
def test_eta_is_refused_by_samplers_without_one(name):
    with pytest.raises(ValueError, match=f"eta=0.0 with sampler='{name}': only ddim takes an eta"):
        make_sampler(ScheduleConfig.sd_v1(), name, eta=0.0)


def test_prediction_types_as_diffusers_supports_them():
    """v-prediction works with every sampler (tested per step above); x_0 ("sample") prediction is
    refused by name where diffusers refuses it: PLMS and Euler a."""
    for name in SAMPLERS:
        make_sampler({"prediction_type": "v_prediction"}, name)
    for name in ("plms", "euler_a"):
        with pytest.raises(ValueError, match="prediction_type"):
            make_sampler({"prediction_type": "sample"}, name)


def test_step_checks_it_is_given_the_runs_next_timestep():
    sampler = make_sampler(ScheduleConfig.sd_v1(), "dpmpp_2m")
    timesteps = sampler.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(RuntimeError, match="next timestep"):
        sampler.step(x, timesteps[1], x)


def test_karras_sigmas_are_eq5_between_the_tables_ends():
    from diffusion.samplers.sigmas import karras_sigmas
    s = karras_sigmas(0.1, 10.0, 5)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)
    inv = s ** (1 / 7)
    assert inv[:-1] - inv[1:] == pytest.approx([(10 ** (1 / 7) - 0.1 ** (1 / 7)) / 4] * 4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_one_conversion_recovers_x0_and_eps_on_both_scales(prediction_type):
    """predicted_x0_and_eps inverts what the UNet is trained to predict (NoiseSchedule.add_noise and
    get_velocity give x_t and v), on the VP scale of DDIM/PLMS/DPM-Solver and the VE scale of Euler."""
    from diffusion.schedule import predicted_x0_and_eps
    schedule = NoiseSchedule(config=ScheduleConfig.sd_v1())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    schedule.alphas_cumprod = schedule.alphas_cumprod.double()
    x_t = schedule.add_noise(x0, eps, t)                                  # VP scale
    target = {"epsilon": eps, "v_prediction": schedule.get_velocity(x0, eps, t), "sample": x0}[prediction_type]
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    alpha_t, sigma_t = a ** 0.5, (1 - a) ** 0.5
    sigma_ve = sigma_t / alpha_t
    for x, alpha, sigma in ((x_t, alpha_t, sigma_t), (x_t / alpha_t, 1, sigma_ve)):   # VP, then VE (Euler)
        got_x0, got_eps = predicted_x0_and_eps(target, x, alpha_t=alpha, sigma_t=sigma, prediction_type=prediction_type)
        assert torch.allclose(got_x0, x0, atol=1e-9) and torch.allclose(got_eps, eps, atol=1e-9)
    with pytest.raises(ValueError, match="prediction_type 'score'"):
        predicted_x0_and_eps(target, x_t, alpha_t=alpha_t, sigma_t=sigma_t, prediction_type="score")
