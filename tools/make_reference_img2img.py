"""Dev-only: reference runs of image to image and inpainting, from diffusers, on the tiny SD checkpoints.

Run with the dev environment, after tools/make_reference_sd.py has written the tiny SD fixtures:

    .venv-dev/bin/python tools/make_reference_img2img.py

Writes under tests/fixtures/img2img/:
- init_*.png, mask_*.png: the small pictures the runs start from (drawn here with numpy, fixed).
- inpaint_unet/ (config.json + diffusion_pytorch_model.safetensors): a tiny random 9-channel inpainting
  UNet (diffusers' UNet2DConditionModel, in_channels 9, as runwayml/stable-diffusion-inpainting's), every
  weight perturbed; inpaint_unet_ldm.safetensors: the same tensors under the original single file's names
  (`model.diffusion_model.*`, input_blocks.0.0.weight of 9 channels), written by make_reference_sd.py's
  proven inverse mapping. The tests build the inpainting pipeline from them: tests/fixtures/sd/tiny_diffusers
  with unet/ replaced, and tiny_single.safetensors with its UNet replaced. Both layouts are loaded here with
  diffusers (`from_pretrained`, `from_single_file`) and checked bit-identical.
- inpaint_unet_trace_inputs.safetensors, inpaint_unet_trace_reference.safetensors: diffusers' 9-channel UNet
  traced module by module (tools/make_reference_traces.py's hooks), for `python -m porting trace`.
- schedulers.safetensors + schedulers.json: every sampler's diffusers scheduler in image to image: the
  timesteps of `get_timesteps` (with `set_begin_index`), `add_noise` at the first kept step, then each step
  on fixed model outputs and `add_noise` at each next step (as the inpainting pipeline's 4-channel blend).
- processor.safetensors: VaeImageProcessor.preprocess of an odd-sized picture (its own size rounded down,
  and a given size) and the inpainting pipeline's mask_processor of a grey-edged mask.
- runs/<run>.json + PNGs: StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline (9- and
  4-channel UNets) runs, two images per prompt and a negative prompt, every sampler, strengths 1.0 and below;
  two of them with a LoRA of tests/fixtures/lora fused (tools/make_reference_lora.py writes those first).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_reference_sampling import SIGMA_SAMPLERS, SD_V1_HUB, SD_V1_LEADING, diffusers_sigma_scheduler  # noqa: E402
from make_reference_sd import perturb, unet_to_ldm  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "img2img"
SD = ROOT / "tests" / "fixtures" / "sd"
SD_FOLDER = SD / "tiny_diffusers"
SD_SINGLE = SD / "tiny_single.safetensors"
UNET_PREFIX = "model.diffusion_model."

# A smaller UNet than the text-to-image one (the fixture stays small), with 9 input channels: the noisy
# latents (4), the mask (1) and the masked image's latents (4), in diffusers' order.
TINY_INPAINT_UNET = dict(sample_size=16, in_channels=9, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)

# (name, picture file, mask file or None, unet "sd" | "inpaint", sampler, steps, strength, eta, height, width,
#  seed, prompt, negative prompt); two images per prompt in every run. height/width None: the picture's own
#  size rounded down (image to image only: diffusers' img2img pipeline takes no size).
RUNS = [
    ("img2img_ddim4_s0.75", "init_48x32.png", None, "sd", "ddim", 4, 0.75, 0.0, None, None, 20, "a red house", "fog"),
    ("img2img_ddim3_s1", "init_48x32.png", None, "sd", "ddim", 3, 1.0, 0.0, None, None, 21, "a red house", "fog"),
    ("img2img_ddim5_eta0.8_s0.6", "init_48x32.png", None, "sd", "ddim", 5, 0.6, 0.8, None, None, 22, "a boat", "rain"),
    ("img2img_plms6_s0.5", "init_48x32.png", None, "sd", "plms", 6, 0.5, None, None, None, 23, "a cat", "dog"),
    ("img2img_plms4_s0.8", "init_48x32.png", None, "sd", "plms", 4, 0.8, None, None, None, 24, "a cat", "dog"),
    ("img2img_dpmpp_2m6_s0.7", "init_48x32.png", None, "sd", "dpmpp_2m", 6, 0.7, None, None, None, 25, "a tree", "snow"),
    ("img2img_dpmpp_2m_karras6_s0.5", "init_48x32.png", None, "sd", "dpmpp_2m_karras", 6, 0.5, None, None, None, 26,
     "a tree", "snow"),
    ("img2img_euler5_s0.6", "init_48x32.png", None, "sd", "euler", 5, 0.6, None, None, None, 27, "a bird", "cage"),
    ("img2img_euler_a5_s0.8", "init_48x32.png", None, "sd", "euler_a", 5, 0.8, None, None, None, 28, "a bird", "cage"),
    # an odd-sized picture: its own size rounded down to the VAE factor (4 here), resized with Lanczos ...
    ("img2img_odd_own_size_ddim4_s0.8", "init_50x35.png", None, "sd", "ddim", 4, 0.8, 0.0, None, None, 29,
     "a lake", "boat"),
    # ... and resized to a given size (diffusers' img2img takes no size: the picture is given preprocessed)
    ("img2img_odd_24x40_euler4_s0.75", "init_50x35.png", None, "sd", "euler", 4, 0.75, None, 24, 40, 30,
     "a lake", "boat"),
    # a 9-channel inpainting UNet, strength 1 (from pure noise) and below
    ("inpaint9_ddim4_s1", "init_48x32.png", "mask_48x32.png", "inpaint", "ddim", 4, 1.0, 0.0, 32, 48, 40,
     "a yellow star", "blur"),
    ("inpaint9_ddim5_eta0.5_s0.7", "init_48x32.png", "mask_48x32.png", "inpaint", "ddim", 5, 0.7, 0.5, 32, 48, 41,
     "a yellow star", "blur"),
    ("inpaint9_plms4_s1", "init_48x32.png", "mask_48x32.png", "inpaint", "plms", 4, 1.0, None, 32, 48, 42,
     "a moon", "sun"),
    ("inpaint9_plms5_s0.6", "init_48x32.png", "mask_48x32.png", "inpaint", "plms", 5, 0.6, None, 32, 48, 43,
     "a moon", "sun"),
    ("inpaint9_dpmpp_2m5_s1", "init_48x32.png", "mask_96x64.png", "inpaint", "dpmpp_2m", 5, 1.0, None, 32, 48, 44,
     "a ship", "storm"),
    ("inpaint9_dpmpp_2m_karras6_s0.75", "init_48x32.png", "mask_48x32.png", "inpaint", "dpmpp_2m_karras", 6, 0.75,
     None, 32, 48, 45, "a ship", "storm"),
    ("inpaint9_euler4_s1", "init_48x32.png", "mask_48x32.png", "inpaint", "euler", 4, 1.0, None, 32, 48, 46,
     "a flower", "weed"),
    ("inpaint9_euler_a5_s0.6", "init_48x32.png", "mask_48x32.png", "inpaint", "euler_a", 5, 0.6, None, 32, 48, 47,
     "a flower", "weed"),
    # an ordinary 4-channel UNet inpainting: the kept region set back after every step
    ("inpaint4_ddim4_s1", "init_48x32.png", "mask_48x32.png", "sd", "ddim", 4, 1.0, 0.0, 32, 48, 50,
     "a green door", "night"),
    ("inpaint4_ddim5_eta0.7_s0.6", "init_48x32.png", "mask_48x32.png", "sd", "ddim", 5, 0.6, 0.7, 32, 48, 51,
     "a green door", "night"),
    ("inpaint4_plms5_s0.75", "init_48x32.png", "mask_48x32.png", "sd", "plms", 5, 0.75, None, 32, 48, 52,
     "a window", "wall"),
    ("inpaint4_dpmpp_2m4_s1", "init_48x32.png", "mask_96x64.png", "sd", "dpmpp_2m", 4, 1.0, None, 32, 48, 53,
     "a lamp", "dark"),
    ("inpaint4_dpmpp_2m_karras6_s0.6", "init_48x32.png", "mask_48x32.png", "sd", "dpmpp_2m_karras", 6, 0.6, None,
     32, 48, 54, "a lamp", "dark"),
    ("inpaint4_euler5_s0.8", "init_48x32.png", "mask_48x32.png", "sd", "euler", 5, 0.8, None, 32, 48, 55,
     "a chair", "table"),
    ("inpaint4_euler_a4_s1", "init_48x32.png", "mask_48x32.png", "sd", "euler_a", 4, 1.0, None, 32, 48, 56,
     "a chair", "table"),
    ("inpaint4_euler_a5_s0.7", "init_48x32.png", "mask_48x32.png", "sd", "euler_a", 5, 0.7, None, 32, 48, 57,
     "a chair", "table"),
    # with a LoRA of tests/fixtures/lora fused (load_lora_weights + fuse_lora(lora_scale=...))
    ("img2img_lora_kohya0.7_ddim4_s0.75", "init_48x32.png", None, "sd", "ddim", 4, 0.75, 0.0, None, None, 58,
     "a red house", "fog"),
    ("inpaint4_lora_diffusers1_euler4_s0.8", "init_48x32.png", "mask_48x32.png", "sd", "euler", 4, 0.8, None, 32,
     48, 59, "a green door", "night"),
]
LORAS = {"img2img_lora_kohya0.7_ddim4_s0.75": ("kohya.safetensors", 0.7),
         "inpaint4_lora_diffusers1_euler4_s0.8": ("diffusers.safetensors", 1.0)}
LORA_FOLDER = ROOT / "tests" / "fixtures" / "lora"

# (name, sampler, scheduler config, steps, strength, eta, noise seed or None): per-step references
SCHEDULER_CASES = (
    [(f"{s}_leading_6_s{k}", s, SD_V1_LEADING, 6, k, None, 60 if s == "euler_a" else None)
     for s in SIGMA_SAMPLERS for k in (0.5, 1.0)]
    + [(f"{s}_hub_5_s0.6", s, SD_V1_HUB, 5, 0.6, None, 61 if s == "euler_a" else None) for s in SIGMA_SAMPLERS]
    + [("ddim_leading_6_s0.5", "ddim", SD_V1_LEADING, 6, 0.5, 0.0, None),
       ("ddim_leading_5_eta0.6_s0.8", "ddim", SD_V1_LEADING, 5, 0.8, 0.6, 62),
       ("plms_hub_6_s0.5", "plms", SD_V1_HUB, 6, 0.5, None, None),
       ("plms_hub_4_s0.8", "plms", SD_V1_HUB, 4, 0.8, None, None),
       ("plms_hub_5_s1", "plms", SD_V1_HUB, 5, 1.0, None, None)]
)


def picture(width: int, height: int) -> Image.Image:
    """A fixed RGB picture with structure at every scale: gradients, waves and a disc."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / (width - 1)
    g = 255 * y / (height - 1)
    b = 128 + 100 * np.sin(x / 3) * np.cos(y / 4)
    disc = (x - width * 0.6) ** 2 + (y - height * 0.45) ** 2 < (min(width, height) * 0.3) ** 2
    rgb = np.stack([np.where(disc, 240, r), np.where(disc, 200, g), np.where(disc, 30, b)], axis=-1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def mask_picture(width: int, height: int) -> Image.Image:
    """White (repaint) over a rectangle right of centre, black elsewhere, with a grey ramp at its left edge
    (binarised at 0.5), as an RGB file (masks are often saved so)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    left, right, top, bottom = 0.35 * width, 0.85 * width, 0.2 * height, 0.8 * height
    ramp = np.clip((x - left) / (0.1 * width), 0, 1)
    value = np.where((x < right) & (y >= top) & (y < bottom), ramp, 0.0) * 255
    return Image.fromarray(np.repeat(value.round().astype(np.uint8)[..., None], 3, axis=-1))


def write_pictures() -> None:
    picture(48, 32).save(OUT / "init_48x32.png")
    picture(50, 35).save(OUT / "init_50x35.png")
    mask_picture(48, 32).save(OUT / "mask_48x32.png")
    mask_picture(96, 64).save(OUT / "mask_96x64.png")     # another size than the image: resized as diffusers


def read_picture(name: str) -> Image.Image:
    """As diffusers.utils.load_image (and common/images.py): the file converted to RGB."""
    return Image.open(OUT / name).convert("RGB")


# ---------------------------------------------------------------- the 9-channel UNet, both layouts
def write_inpaint_unet() -> None:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_INPAINT_UNET).eval()
    perturb(unet, torch.Generator().manual_seed(1))
    folder = OUT / "inpaint_unet"
    if folder.exists():
        shutil.rmtree(folder)
    unet.save_pretrained(folder, safe_serialization=True)
    cfg = unet.config
    cross = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    ldm = unet_to_ldm(unet.state_dict(), len(cfg.block_out_channels), cfg.layers_per_block, cross)
    save_file({k: v.contiguous() for k, v in sorted(ldm.items())}, str(OUT / "inpaint_unet_ldm.safetensors"))


def inpaint_folder(tmp: Path) -> Path:
    """tiny_diffusers with its UNet replaced by the 9-channel one (what the tests build too)."""
    folder = tmp / "tiny_inpaint"
    shutil.copytree(SD_FOLDER, folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(OUT / "inpaint_unet", folder / "unet")
    return folder


def inpaint_single_file(tmp: Path) -> Path:
    """tiny_single.safetensors with its UNet replaced by the 9-channel one (what the tests build too)."""
    tensors = {k: v for k, v in load_file(str(SD_SINGLE)).items() if not k.startswith(UNET_PREFIX)}
    tensors |= load_file(str(OUT / "inpaint_unet_ldm.safetensors"))
    path = tmp / "tiny_inpaint.safetensors"
    save_file(tensors, str(path))
    return path


def prove_inpaint_layouts(folder: Path, single: Path) -> None:
    """diffusers' own loaders read both layouts into bit-identical UNets with 9 input channels."""
    from diffusers import StableDiffusionInpaintPipeline
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    a = StableDiffusionInpaintPipeline.from_pretrained(str(folder), **kwargs)
    b = StableDiffusionInpaintPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                        **kwargs)
    assert a.unet.config.in_channels == b.unet.config.in_channels == 9
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(want) == set(got), name
        bad = [k for k in want if not torch.equal(want[k], got[k])]
        assert not bad, f"from_single_file {name}: {bad[:5]} differ"
    print("inpainting UNet: folder and single file bit-identical in diffusers")


def write_inpaint_trace() -> None:
    """Every module's output of diffusers' 9-channel UNet on fixed inputs (make_reference_traces.py's hooks),
    for the porter's trace of an inpainting UNet (python -m porting trace --component unet)."""
    from diffusers import UNet2DConditionModel
    from make_reference_traces import trace
    sys.path.insert(0, str(ROOT))
    from porting.trace import write_trace
    unet = UNet2DConditionModel.from_pretrained(str(OUT / "inpaint_unet")).eval()
    g = torch.Generator().manual_seed(4)
    x = {"sample": torch.randn(1, 9, 4, 4, generator=g), "timestep": torch.tensor([411.0]),
         "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    outputs = trace(unet, lambda: unet(x["sample"], x["timestep"], x["encoder_hidden_states"]), {"": ""})
    save_file({k: v.contiguous() for k, v in x.items()}, str(OUT / "inpaint_unet_trace_inputs.safetensors"))
    write_trace(OUT / "inpaint_unet_trace_reference.safetensors", outputs,
                {"made_by": "tools/make_reference_img2img.py", "model": "tests/fixtures/img2img/inpaint_unet"})
    print(f"inpainting UNet trace: {len(outputs)} modules")


# ---------------------------------------------------------------- image processors
def write_processor_fixtures() -> None:
    from diffusers.image_processor import VaeImageProcessor
    image_processor = VaeImageProcessor(vae_scale_factor=4)
    mask_processor = VaeImageProcessor(vae_scale_factor=4, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    odd = read_picture("init_50x35.png")
    mask = read_picture("mask_96x64.png")
    tensors = {"image_own_size": image_processor.preprocess(odd),                      # 32 x 48
               "image_24x40": image_processor.preprocess(odd, height=24, width=40),
               "mask_32x48": mask_processor.preprocess(mask, height=32, width=48),
               "mask_own_size": mask_processor.preprocess(read_picture("mask_48x32.png"))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "processor.safetensors"))


# ---------------------------------------------------------------- schedulers in image to image
def scheduler_for(sampler: str, config: dict):
    from diffusers import DDIMScheduler, PNDMScheduler
    if sampler in SIGMA_SAMPLERS:
        return diffusers_sigma_scheduler(sampler, config)
    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDIMScheduler.from_config(plain) if sampler == "ddim" else PNDMScheduler.from_config(plain, skip_prk_steps=True)


def get_timesteps(scheduler, steps: int, strength: float):
    """StableDiffusionImg2ImgPipeline.get_timesteps, verbatim in effect."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, t_start


def write_scheduler_fixtures() -> None:
    tensors, cases = {}, []
    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 2, 2)    # a batch of two: Euler a's noise is one draw for both
    for name, sampler, config, steps, strength, eta, seed in SCHEDULER_CASES:
        sched = scheduler_for(sampler, config)
        sched.set_timesteps(steps)
        timesteps, t_start = get_timesteps(sched, steps, strength)
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x = sched.add_noise(x0, noise, timesteps[:1].repeat(shape[0]))
        tensors[f"{name}.x0"], tensors[f"{name}.noise"], tensors[f"{name}.start"] = x0, noise, x
        noise_gen = torch.Generator().manual_seed(seed) if seed is not None else None
        outputs, xs, kept = [], [], []
        for i, t in enumerate(timesteps):
            outputs.append(torch.randn(shape, generator=g))
            sched.scale_model_input(x, t)                   # the Euler schedulers count their steps here too
            kwargs = {"eta": eta} if sampler == "ddim" else {}
            if noise_gen is not None:
                kwargs["generator"] = noise_gen
            x = sched.step(outputs[-1], t, x, **kwargs).prev_sample
            xs.append(x)
            if i < len(timesteps) - 1:                      # the 4-channel inpainting blend's noising
                kept.append(sched.add_noise(x0, noise, torch.tensor([timesteps[i + 1]])))
        tensors[f"{name}.model_outputs"] = torch.stack(outputs)
        tensors[f"{name}.xs"] = torch.stack(xs)
        if kept:
            tensors[f"{name}.next_noised"] = torch.stack(kept)
        cases.append(dict(name=name, sampler=sampler, scheduler_config=config, steps=steps, strength=strength, eta=eta,
                          noise_seed=seed, start=t_start, timesteps=[t.item() for t in timesteps],
                          diffusers_scheduler=type(sched).__name__))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "schedulers.safetensors"))
    (OUT / "schedulers.json").write_text(json.dumps(dict(cases=cases), indent=1, sort_keys=True) + "\n")
    print(f"{len(cases)} scheduler cases")


# ---------------------------------------------------------------- whole pipelines
def set_scheduler(pipe, sampler: str) -> None:
    config = json.loads((SD_FOLDER / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = scheduler_for(sampler, config)


def run_pipeline(pipes: dict, run: tuple) -> list:
    name, init, mask, unet, sampler, steps, strength, eta, height, width, seed, prompt, negative = run
    kwargs = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=2, num_inference_steps=steps,
                  strength=strength, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
                  output_type="pil")
    if sampler == "ddim":
        kwargs["eta"] = eta
    image = read_picture(init)
    if mask is None:
        pipe = pipes["img2img"]
        if height is not None:    # the picture given preprocessed to the size (the pipeline takes no size)
            image = pipe.image_processor.preprocess(image, height=height, width=width)
    else:
        pipe = pipes[f"inpaint_{unet}"]
        kwargs |= dict(mask_image=read_picture(mask), height=height, width=width)
    if name in LORAS:     # a fresh pipeline of the same class, the LoRA fused into its weights
        from make_reference_lora import load
        file, scale = LORAS[name]
        pipe = type(pipe).from_pretrained(str(SD_FOLDER), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        load(pipe, LORA_FOLDER / file)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    set_scheduler(pipe, sampler)
    return pipe(image=image, **kwargs).images


def file_hashes(files: list[Path]) -> dict[str, str]:
    return {str(p.relative_to(ROOT / "tests" / "fixtures")): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def write_runs(folder: Path) -> None:
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    pipes = {"img2img": StableDiffusionImg2ImgPipeline.from_pretrained(str(SD_FOLDER), **kwargs),
             "inpaint_sd": StableDiffusionInpaintPipeline.from_pretrained(str(SD_FOLDER), **kwargs),
             "inpaint_inpaint": StableDiffusionInpaintPipeline.from_pretrained(str(folder), **kwargs)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    out = OUT / "runs"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for run in RUNS:
        name, init, mask, unet, sampler, steps, strength, eta, height, width, seed, prompt, negative = run
        images = run_pipeline(pipes, run)
        files = []
        for i, image in enumerate(images):
            files.append(f"{name}_{i}.png")
            image.save(out / files[-1])
        params = dict(init_image=init, mask_image=mask, unet=unet, sampler=sampler, steps=steps, strength=strength,
                      eta=eta, height=height, width=width, seed=seed, prompt=prompt, negative_prompt=negative,
                      num_images_per_prompt=2, guidance_scale=7.5, images=files, lora=LORAS.get(name),
                      pipeline=type(pipes["img2img" if mask is None else f"inpaint_{unet}"]).__name__,
                      scheduler=type(pipes["img2img" if mask is None else f"inpaint_{unet}"].scheduler).__name__,
                      diffusers_version=diffusers.__version__)
        (out / f"{name}.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {len(images)} images {images[0].size}")
    weights = sorted(p for p in SD_FOLDER.rglob("*") if p.is_file()) + [SD_SINGLE] + sorted(
        p for p in (OUT / "inpaint_unet").rglob("*") if p.is_file()) + [OUT / "inpaint_unet_ldm.safetensors"] + [
        LORA_FOLDER / file for file, _ in sorted(set(LORAS.values()))]
    (out / "weights_sha256.json").write_text(json.dumps(file_hashes(weights), indent=1, sort_keys=True) + "\n")


def main() -> None:
    if not SD_FOLDER.exists():
        sys.exit(f"{SD_FOLDER} does not exist yet: run tools/make_reference_sd.py first")
    OUT.mkdir(parents=True, exist_ok=True)
    write_pictures()
    write_inpaint_unet()
    write_inpaint_trace()
    write_processor_fixtures()
    write_scheduler_fixtures()
    with tempfile.TemporaryDirectory() as tmp:
        folder = inpaint_folder(Path(tmp))
        prove_inpaint_layouts(folder, inpaint_single_file(Path(tmp)))
        write_runs(folder)


if __name__ == "__main__":
    main()
