"""Dev-only: reference tensors for the samplers and whole text-to-image runs, from diffusers.

Run with the dev environment, after tools/make_reference_sd.py has written the tiny SD fixtures:

    .venv-dev/bin/python tools/make_reference_sampling.py

Writes under tests/fixtures/sampling/:
- schedulers.safetensors + schedulers.json: for each case (DDIMScheduler with eta 0 and eta > 0,
  PNDMScheduler(skip_prk_steps=True) with 1..10 steps, DPMSolverMultistepScheduler with and without
  Karras sigmas, EulerDiscreteScheduler and EulerAncestralDiscreteScheduler with 1, 2, 3 and 25
  steps, several beta schedules, spacings and prediction types) the starting latents, a fixed
  sequence of model outputs (one per model call), diffusers' latents after every step and, for
  the samplers that rescale it, the UNet input of every step; also the alphas_cumprod tables,
  add_noise and get_velocity outputs.
- pipeline/<run>.png + pipeline/<run>.json: whole StableDiffusionPipeline runs on the tiny diffusers
  folder (tests/fixtures/sd/tiny_diffusers), uint8 images exactly as the pipeline's "pil" output.
- half/<cpu kind>/<run>_<bf16|fp16>.json + PNGs: some of those runs again with torch_dtype bfloat16 /
  float16 (`--half_only` writes only these). Their bits depend on the CPU's kernels, so each kind of CPU
  (common/precision.cpu_kind: "AVX2", "AVX512+bf16", ...) has its own folder: run this on a CPU of each
  kind the suite should check tightly; other kinds are checked against the fp32 images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "sampling"
SD_FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"

# SD v1's scheduler_config.json values (runwayml/stable-diffusion-v1-5), as a DDIM/PNDM config.
SD_V1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
SD_V1_DDIM = dict(SD_V1, clip_sample=False)
SD_V1_PNDM = dict(SD_V1, skip_prk_steps=True)

LATENT_SHAPE = (2, 4, 4, 4)

# SD v1's public scheduler_config.json exactly as runwayml/stable-diffusion-v1-5 ships it: it has no
# timestep_spacing, so diffusers' DPM-Solver and Euler schedulers built from it run on their own
# default ("linspace"), while DDIM/PNDM run on "leading" (see `check_sd_v1_spacing_rule`).
SD_V1_HUB = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
# The tiny fixture folder's config (a DDIMScheduler saved by diffusers 0.42) names "leading".
SD_V1_LEADING = dict(SD_V1_HUB, timestep_spacing="leading", _class_name="DDIMScheduler")
COSINE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
# The samplers with a sigma schedule: (our name, diffusers class name, extra diffusers options).
SIGMA_SAMPLERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}
# (name, sampler, scheduler config as the checkpoint's scheduler_config.json holds it, steps, noise seed)
# (diffusers 0.42 cannot run Karras sigmas on the cosine schedule: its truncated timesteps repeat 998 and
# its step index then runs off the end, so no cosine Karras case.)
SIGMA_CASES = (
    [(f"{s}_sd_{n}", s, SD_V1_HUB, n, 30 + n) for s in SIGMA_SAMPLERS for n in (1, 2, 3, 25)]
    + [(f"{s}_leading_{n}", s, SD_V1_LEADING, n, 40 + n) for s in SIGMA_SAMPLERS for n in (1, 2, 3, 6)]
    + [(f"{s}_vpred_trailing_5", s, dict(SD_V1_LEADING, prediction_type="v_prediction",
                                         timestep_spacing="trailing", steps_offset=0), 5, 50) for s in SIGMA_SAMPLERS]
    + [("dpmpp_2m_karras_linear_8", "dpmpp_2m_karras", dict(num_train_timesteps=1000, beta_schedule="linear"), 8, None),
       ("dpmpp_2m_x0pred_linear_leading_6", "dpmpp_2m", dict(num_train_timesteps=1000, beta_schedule="linear",
                                                             prediction_type="sample", timestep_spacing="leading",
                                                             steps_offset=1), 6, None),
       ("euler_x0pred_cosine_7", "euler", dict(COSINE, prediction_type="sample"), 7, None)]
)
SIGMA_LATENT_SHAPE = (1, 4, 4, 4)   # euler_a draws (2, 4, 4, 4): one noise draw for a batch of two

# (name, sampler, scheduler config, steps, eta, noise seed or None)
SCHEDULER_CASES = [
    ("ddim_sd_eta0_10", "ddim", SD_V1_DDIM, 10, 0.0, None),
    ("ddim_sd_eta0.7_10", "ddim", SD_V1_DDIM, 10, 0.7, 123),
    ("ddim_sd_eta1_4", "ddim", SD_V1_DDIM, 4, 1.0, 7),
    ("ddim_vpred_trailing_6", "ddim", dict(SD_V1_DDIM, prediction_type="v_prediction",
                                            timestep_spacing="trailing", steps_offset=0), 6, 0.0, None),
    ("ddim_linear_linspace_clip_5", "ddim", dict(num_train_timesteps=1000, beta_schedule="linear",
                                                 timestep_spacing="linspace", clip_sample=True,
                                                 set_alpha_to_one=True), 5, 0.0, None),
    ("ddim_cosine_eta0.3_7", "ddim", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                          clip_sample=False, set_alpha_to_one=False), 7, 0.3, 5),
    ("plms_sd_1", "plms", SD_V1_PNDM, 1, 0.0, None),
    ("plms_sd_2", "plms", SD_V1_PNDM, 2, 0.0, None),
    ("plms_sd_3", "plms", SD_V1_PNDM, 3, 0.0, None),
    ("plms_sd_4", "plms", SD_V1_PNDM, 4, 0.0, None),
    ("plms_sd_10", "plms", SD_V1_PNDM, 10, 0.0, None),
    ("plms_vpred_trailing_5", "plms", dict(SD_V1_PNDM, prediction_type="v_prediction",
                                           timestep_spacing="trailing", steps_offset=0), 5, 0.0, None),
    ("plms_cosine_linspace_6", "plms", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                            timestep_spacing="linspace", skip_prk_steps=True), 6, 0.0, None),
    ("ddim_x0pred_clip_eta0.5_5", "ddim", dict(SD_V1_DDIM, prediction_type="sample", clip_sample=True,
                                               clip_sample_range=0.8), 5, 0.5, 11),
]


def public_config(scheduler) -> dict:
    """The scheduler's config as its scheduler_config.json holds it (diffusers' own "_" keys dropped;
    `_use_default_values` is a set, whose order would change every run)."""
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def diffusers_sigma_scheduler(sampler: str, config: dict):
    """diffusers' scheduler for `sampler`, built as a user builds it from a pipeline's scheduler:
    `Cls.from_config(pipe.scheduler.config)`, the pipeline's own scheduler read from `config`."""
    import diffusers
    class_name, options = SIGMA_SAMPLERS[sampler]
    loaded_as = getattr(diffusers, config.get("_class_name", "DDIMScheduler"))
    pipeline_scheduler = loaded_as.from_config({k: v for k, v in config.items() if k != "_class_name"})
    return getattr(diffusers, class_name).from_config(pipeline_scheduler.config, **options)


def check_sd_v1_spacing_rule() -> None:
    """The rule the samplers follow (diffusion/samplers/sigmas.py), checked on this diffusers version."""
    for sampler in SIGMA_SAMPLERS:
        assert diffusers_sigma_scheduler(sampler, SD_V1_HUB).config.timestep_spacing == "linspace", sampler
        assert diffusers_sigma_scheduler(sampler, SD_V1_LEADING).config.timestep_spacing == "leading", sampler


def make_sigma_cases(tensors: dict, cases: list) -> None:
    """Per-step references for the DPM-Solver and Euler schedulers, from their own generator."""
    check_sd_v1_spacing_rule()
    g = torch.Generator().manual_seed(1)
    for name, sampler, config, steps, seed in SIGMA_CASES:
        sched = diffusers_sigma_scheduler(sampler, config)
        sched.set_timesteps(steps)
        shape = (2, 4, 4, 4) if sampler == "euler_a" else SIGMA_LATENT_SHAPE
        x_T = torch.randn(shape, generator=g)
        tensors[f"{name}.x_T"] = x_T
        x = x_T * sched.init_noise_sigma            # as StableDiffusionPipeline.prepare_latents
        noise_gen = torch.Generator().manual_seed(seed) if seed is not None else None
        model_outputs, xs, scaled_inputs = [], [], []
        for t in sched.timesteps:
            model_outputs.append(torch.randn(shape, generator=g))
            scaled_inputs.append(sched.scale_model_input(x, t))
            kwargs = dict(generator=noise_gen) if sampler == "euler_a" else {}
            x = sched.step(model_outputs[-1], t, x, **kwargs).prev_sample
            xs.append(x)
        # one (steps, *shape) tensor each: a few tensors per case keep the file small
        tensors[f"{name}.model_outputs"] = torch.stack(model_outputs)
        tensors[f"{name}.xs"] = torch.stack(xs)
        if sampler.startswith("euler"):   # DPM-Solver's scaled input is x itself
            tensors[f"{name}.scaled_inputs"] = torch.stack(scaled_inputs)
        cases.append(dict(name=name, sampler=sampler, scheduler_config=config, steps=steps, eta=None,
                          noise_seed=seed, timesteps=[t.item() for t in sched.timesteps],
                          diffusers_scheduler=type(sched).__name__,
                          diffusers_timestep_spacing=sched.config.timestep_spacing))


def make_scheduler_fixtures() -> None:
    from diffusers import DDIMScheduler, PNDMScheduler

    tensors: dict[str, torch.Tensor] = {}
    cases = []
    g = torch.Generator().manual_seed(0)
    for name, sampler, config, steps, eta, seed in SCHEDULER_CASES:
        sched = DDIMScheduler(**config) if sampler == "ddim" else PNDMScheduler(**config)
        sched.set_timesteps(steps)
        timesteps = [int(t) for t in sched.timesteps]
        x = torch.randn(LATENT_SHAPE, generator=g)
        tensors[f"{name}.x_T"] = x
        noise_gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for i, t in enumerate(sched.timesteps):
            # a fixed model output per call, independent of x: the test feeds the same one
            model_output = torch.randn(LATENT_SHAPE, generator=g)
            if sampler == "ddim":
                x = sched.step(model_output, t, x, eta=eta, generator=noise_gen).prev_sample
            else:
                x = sched.step(model_output, t, x).prev_sample
            tensors[f"{name}.model_output.{i}"] = model_output
            tensors[f"{name}.x.{i}"] = x
        cases.append(dict(name=name, sampler=sampler, scheduler_config=public_config(sched), steps=steps,
                          eta=eta, noise_seed=seed, timesteps=timesteps))

    make_sigma_cases(tensors, cases)

    # the forward process and the v target, on every beta schedule
    forward = []
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    noise = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    for beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config = dict(SD_V1_DDIM, beta_schedule=beta_schedule)
        sched = DDIMScheduler(**config)
        tensors[f"{beta_schedule}.alphas_cumprod"] = sched.alphas_cumprod
        tensors[f"{beta_schedule}.add_noise"] = sched.add_noise(x0, noise, t)
        tensors[f"{beta_schedule}.get_velocity"] = sched.get_velocity(x0, noise, t)
        forward.append(dict(beta_schedule=beta_schedule, scheduler_config=public_config(sched)))
    tensors["forward.x0"], tensors["forward.noise"], tensors["forward.t"] = x0, noise, t

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "schedulers.safetensors"))
    (OUT / "schedulers.json").write_text(json.dumps(dict(cases=cases, forward=forward), indent=1) + "\n")
    print(f"wrote {OUT / 'schedulers.safetensors'} ({len(tensors)} tensors), {OUT / 'schedulers.json'}")


# Whole pipeline runs: (name, prompt or prompts, negative prompt, images per prompt, steps, eta,
# guidance scale, height, width, seed, sampler). Sizes are tiny (the fixtures' VAE has few levels).
PIPELINE_RUNS = [
    ("ddim_cat_2x32x32", "a photo of a cat", None, 2, 4, 0.0, 7.5, 32, 32, 0, "ddim"),
    ("ddim_astronaut_nocfg_64x48", "an astronaut riding a horse on the moon", None, 1, 5, 0.0, 1.0, 64, 48, 1,
     "ddim"),
    ("ddim_eta0.8_lighthouse_48x32", "a watercolor of a lighthouse", None, 2, 4, 0.8, 7.5, 48, 32, 2, "ddim"),
    ("ddim_negative_fruit_32x48", "a bowl of fruit", "blurry, low quality", 1, 3, 0.0, 5.0, 32, 48, 3, "ddim"),
    ("plms3_car_2x32x32", "a red car", None, 2, 3, 0.0, 7.5, 32, 32, 4, "plms"),
    ("plms4_castle_nocfg_48x64", "a castle on a hill", None, 1, 4, 0.0, 1.0, 48, 64, 5, "plms"),
    ("plms10_negative_forest_32x32", "a snowy forest", "people", 1, 10, 0.0, 7.5, 32, 32, 6, "plms"),
    # the samplers with fewer steps, each with two images per prompt and a negative prompt
    ("dpmpp_2m5_negative_apple_2x32x32", "a green apple", "blurry", 2, 5, None, 7.5, 32, 32, 8, "dpmpp_2m"),
    ("dpmpp_2m_karras6_negative_boat_2x32x32", "a boat at sea", "storm", 2, 6, None, 7.5, 32, 32, 9,
     "dpmpp_2m_karras"),
    ("euler4_negative_house_2x32x32", "a small house", "night", 2, 4, None, 7.5, 32, 32, 10, "euler"),
    ("euler_a5_negative_bird_2x32x32", "a blue bird", "cage", 2, 5, None, 7.5, 32, 32, 11, "euler_a"),
    # two prompts in one call (one batch, one noise draw for all four images): for generate() itself
    ("ddim_two_prompts_2x32x32", ["a cat", "a dog in the rain"], ["", "sunny"], 2, 3, 0.0, 7.5, 32, 32, 7,
     "ddim"),
    ("euler_a_two_prompts_2x32x32", ["a cat", "a dog in the rain"], ["", "sunny"], 2, 3, None, 7.5, 32, 32, 12,
     "euler_a"),
]


def sd_fixture_hashes() -> dict[str, str]:
    """sha256 of every file of the tiny SD folder: the pipeline runs are only valid for these weights."""
    import hashlib
    return {str(p.relative_to(SD_FOLDER)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(SD_FOLDER.rglob("*")) if p.is_file()}


def run_pipeline(pipe, ddim, run) -> list:
    """One PIPELINE_RUNS entry through `pipe`, with the scheduler its sampler names (`ddim`: the folder's own)."""
    from diffusers import PNDMScheduler
    name, prompt, negative, n, steps, eta, scale, height, width, seed, sampler = run
    pipe.scheduler = ({"ddim": ddim, "plms": PNDMScheduler.from_config(ddim.config, skip_prk_steps=True)}
                      .get(sampler) or diffusers_sigma_scheduler(
                          sampler, json.loads((SD_FOLDER / "scheduler" / "scheduler_config.json").read_text())))
    kwargs = dict(eta=eta) if sampler == "ddim" else {}
    return pipe(prompt, negative_prompt=negative, num_images_per_prompt=n, num_inference_steps=steps,
                guidance_scale=scale, height=height, width=width,
                generator=torch.Generator().manual_seed(seed), output_type="pil", **kwargs).images


def make_pipeline_fixtures() -> None:
    from diffusers import StableDiffusionPipeline
    import diffusers

    pipe = StableDiffusionPipeline.from_pretrained(str(SD_FOLDER), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ddim = pipe.scheduler
    out = OUT / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    for name, prompt, negative, n, steps, eta, scale, height, width, seed, sampler in PIPELINE_RUNS:
        images = run_pipeline(pipe, ddim, (name, prompt, negative, n, steps, eta, scale, height, width, seed, sampler))
        files = []
        for i, image in enumerate(images):
            files.append(f"{name}_{i}.png")
            image.save(out / files[-1])
        params = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=n, steps=steps, eta=eta,
                      guidance_scale=scale, height=height, width=width, seed=seed, sampler=sampler,
                      scheduler=type(pipe.scheduler).__name__, images=files,
                      diffusers_version=diffusers.__version__)
        (out / f"{name}.json").write_text(json.dumps(params, indent=1) + "\n")
        print(f"{name}: {len(images)} images {images[0].size}")
    (out / "sd_fixture_sha256.json").write_text(json.dumps(sd_fixture_hashes(), indent=1) + "\n")


# The runs of PIPELINE_RUNS also made with half-precision weights, as diffusers' users ask for them:
# `StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)` (and float16).
HALF_PRECISION_RUNS = ["ddim_cat_2x32x32", "plms3_car_2x32x32", "dpmpp_2m5_negative_apple_2x32x32",
                       "euler_a5_negative_bird_2x32x32"]


def make_half_precision_fixtures() -> None:
    """half/<cpu kind>/<run>_<bf16|fp16>.json + PNGs: the runs above with torch_dtype=bfloat16 and float16,
    on this CPU's kind (only that kind's folder is rewritten)."""
    from diffusers import StableDiffusionPipeline
    import diffusers
    sys.path.insert(0, str(ROOT))
    from common.precision import cpu_kind        # torch only: the same string the tests compute

    kind = cpu_kind()
    out = OUT / "half" / kind
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    runs = {run[0]: run for run in PIPELINE_RUNS}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        pipe = StableDiffusionPipeline.from_pretrained(str(SD_FOLDER), torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        ddim = pipe.scheduler
        for run_name in HALF_PRECISION_RUNS:
            name, prompt, negative, n, steps, eta, scale, height, width, seed, sampler = runs[run_name]
            images = run_pipeline(pipe, ddim, runs[run_name])
            files = []
            for i, image in enumerate(images):
                files.append(f"{name}_{dtype_name}_{i}.png")
                image.save(out / files[-1])
            params = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=n, steps=steps, eta=eta,
                          guidance_scale=scale, height=height, width=width, seed=seed, sampler=sampler,
                          torch_dtype=dtype_name, scheduler=type(pipe.scheduler).__name__, images=files,
                          fp32_images=[f"{name}_{i}.png" for i in range(len(images))],
                          diffusers_version=diffusers.__version__, torch_version=torch.__version__,
                          cpu_kind=kind)
            (out / f"{name}_{dtype_name}.json").write_text(json.dumps(params, indent=1) + "\n")
            print(f"{name} {dtype_name}: {len(images)} images {images[0].size}")


if __name__ == "__main__":
    if "--half_only" not in sys.argv:
        make_scheduler_fixtures()
    if not SD_FOLDER.exists():
        sys.exit(f"{SD_FOLDER} does not exist yet (tools/make_reference_sd.py makes it): pipeline runs skipped")
    if "--half_only" not in sys.argv:
        make_pipeline_fixtures()
    make_half_precision_fixtures()
