"""Image to image and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline, image for image, and every sampler's image-to-image steps against its
diffusers scheduler (get_timesteps with set_begin_index, add_noise).

The references (tools/make_reference_img2img.py) used the tiny random SD checkpoint of tests/fixtures/sd/
and, for inpainting, the same pipeline with a tiny random 9-channel UNet (tests/fixtures/img2img/
inpaint_unet, and its original single-file layout inpaint_unet_ldm.safetensors), two images per prompt, a
negative prompt and generator=torch.Generator().manual_seed(seed). sample.py must give the same uint8 images
within 2/255 per pixel from the diffusers folder and from the single file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from common.images import load_image
from diffusion.init_image import default_size, image_to_pixels, mask_to_pixels
from diffusion.pipeline import start_step
from diffusion.samplers import make_sampler

FIXTURES = Path(__file__).parent / "fixtures"
IMG = FIXTURES / "img2img"
RUNS = IMG / "runs"
SD_FOLDER = FIXTURES / "sd" / "tiny_diffusers"
SD_SINGLE = FIXTURES / "sd" / "tiny_single.safetensors"
MAX_DIFF = 2   # out of 255
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models gain nothing from threads on a shared machine (as tests/test_sample.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reference_runs_were_made_from_these_weights():
    from common.files import file_sha256
    for name, digest in json.loads((RUNS / "weights_sha256.json").read_text()).items():
        assert file_sha256(FIXTURES / name) == digest, (
            f"{name} changed since the reference runs were made: rerun tools/make_reference_img2img.py")


# ------------------------------------------------------------------ samplers
def _scheduler_cases():
    meta = json.loads((IMG / "schedulers.json").read_text())
    return [pytest.param(c, id=c["name"]) for c in meta["cases"]]


@pytest.fixture(scope="module")
def scheduler_tensors():
    return load_file(str(IMG / "schedulers.safetensors"))


@pytest.mark.parametrize("case", _scheduler_cases())
def test_image_to_image_steps_equal_diffusers(case, scheduler_tensors):
    """set_timesteps(steps, start=...) is diffusers' get_timesteps (+ set_begin_index); add_noise at the
    run's first step and at each next step equals the scheduler's add_noise; the steps then equal its steps."""
    tensors, name = scheduler_tensors, case["name"]
    assert start_step(case["steps"], case["strength"]) == case["start"]
    sampler = make_sampler(case["scheduler_config"], case["sampler"],
                           eta=case["eta"] if case["sampler"] == "ddim" else None)
    timesteps = sampler.set_timesteps(case["steps"], start=case["start"])
    assert timesteps.tolist() == case["timesteps"]
    x0, noise = tensors[f"{name}.x0"], tensors[f"{name}.noise"]
    x = sampler.add_noise(x0, noise, 0)
    assert (x - tensors[f"{name}.start"]).abs().max() <= TOL
    generator = torch.Generator().manual_seed(case["noise_seed"]) if case["noise_seed"] is not None else None
    for i, t in enumerate(timesteps):
        sampler.scale_model_input(x, t)
        x = sampler.step(tensors[f"{name}.model_outputs"][i], t, x, generator=generator)
        diff = (x - tensors[f"{name}.xs"][i]).abs().max().item()
        assert diff <= TOL, f"{name}: step {i} (t={float(t)}) max |diff| {diff:.3g}"
        if i < len(timesteps) - 1:
            diff = (sampler.add_noise(x0, noise, i + 1) - tensors[f"{name}.next_noised"][i]).abs().max().item()
            assert diff <= TOL, f"{name}: add_noise at step {i + 1} max |diff| {diff:.3g}"


def test_every_sampler_has_image_to_image_cases():
    from diffusion.samplers import SAMPLERS
    meta = json.loads((IMG / "schedulers.json").read_text())
    assert {c["sampler"] for c in meta["cases"]} == set(SAMPLERS)


# ------------------------------------------------------------------ pictures
def test_pictures_are_prepared_as_vae_image_processor():
    """The odd-sized picture at its own size rounded down to the VAE factor and at a given size (Lanczos,
    [-1, 1]); the mask grayscale, resized and binarised at 0.5 (the inpainting pipeline's mask_processor)."""
    want = load_file(str(IMG / "processor.safetensors"))
    odd = load_image(IMG / "init_50x35.png")
    assert default_size(odd, None, None, factor=4) == (32, 48)
    assert torch.equal(image_to_pixels(odd, 32, 48), want["image_own_size"])
    assert torch.equal(image_to_pixels(odd, 24, 40), want["image_24x40"])
    assert torch.equal(mask_to_pixels(load_image(IMG / "mask_96x64.png"), 32, 48), want["mask_32x48"])
    assert torch.equal(mask_to_pixels(load_image(IMG / "mask_48x32.png"), 32, 48), want["mask_own_size"])


# ------------------------------------------------------------------ whole runs through sample.py
@pytest.fixture(scope="module")
def inpaint_checkpoints(tmp_path_factory):
    """The 9-channel pipeline in both layouts: tiny_diffusers with unet/ replaced, and tiny_single with its
    model.diffusion_model.* tensors replaced (as tools/make_reference_img2img.py builds them)."""
    tmp = tmp_path_factory.mktemp("inpaint")
    folder = tmp / "tiny_inpaint"
    shutil.copytree(SD_FOLDER, folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(IMG / "inpaint_unet", folder / "unet")
    tensors = {k: v for k, v in load_file(str(SD_SINGLE)).items() if not k.startswith("model.diffusion_model.")}
    tensors |= load_file(str(IMG / "inpaint_unet_ldm.safetensors"))
    single = tmp / "tiny_inpaint.safetensors"
    save_file(tensors, str(single))
    return {"folder": folder, "single_file": single}


def _runs():
    return [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(RUNS.glob("*.json"))
            if p.name != "weights_sha256.json"]


def _argv(run, ckpt: Path, config: Path | None, outdir: Path) -> list[str]:
    argv = ["--ckpt", str(ckpt), "--outdir", str(outdir), "--prompt", run["prompt"],
            "--negative_prompt", run["negative_prompt"], "--n_samples", str(run["num_images_per_prompt"]),
            "--ddim_steps", str(run["steps"]), "--scale", str(run["guidance_scale"]), "--seed", str(run["seed"]),
            "--sampler", run["sampler"], "--init-img", str(IMG / run["init_image"]),
            "--strength", str(run["strength"]), "--device", "cpu"]
    if run["height"] is not None:
        argv += ["--H", str(run["height"]), "--W", str(run["width"])]
    if run["mask_image"] is not None:
        argv += ["--mask", str(IMG / run["mask_image"])]
    if run["sampler"] == "ddim":
        argv += ["--ddim_eta", str(run["eta"])]
    if config is not None:
        argv += ["--config", str(config)]
    return argv


@pytest.mark.parametrize("layout, run", [pytest.param(layout, r, id=f"{layout}-{r['name']}")
                                         for layout in ("folder", "single_file") for r in _runs()])
def test_sample_py_equals_diffusers(layout, run, tmp_path, inpaint_checkpoints, capsys):
    if run["unet"] == "inpaint":
        folder = inpaint_checkpoints["folder"]
        ckpt = folder if layout == "folder" else inpaint_checkpoints["single_file"]
    else:
        folder = SD_FOLDER
        ckpt = SD_FOLDER if layout == "folder" else SD_SINGLE
    # the tiny checkpoints are not SD v1-shaped in what shapes cannot tell: the single file takes --config
    written = sample.main(_argv(run, ckpt, None if layout == "folder" else folder, tmp_path))
    n = run["num_images_per_prompt"]
    ours = [np.asarray(Image.open(p)) for p in written[:n]]
    for i, file in enumerate(run["images"]):
        want = np.asarray(Image.open(RUNS / file))
        assert ours[i].shape == want.shape, f"{run['name']} image {i}: {ours[i].shape} != {want.shape}"
        diff = np.abs(ours[i].astype(int) - want.astype(int)).max()
        assert diff <= MAX_DIFF, f"{run['name']} ({layout}) image {i}: max |diff| {diff}/255 > {MAX_DIFF}/255"
    if run["mask_image"] == "mask_96x64.png":
        assert "--mask" in capsys.readouterr().err, "a mask of another size than the picture is said on stderr"
