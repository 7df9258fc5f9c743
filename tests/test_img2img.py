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
from diffusion.init_image import default_size, image_to_pixels, mask_to_pixels, start_step
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


def _run(name: str) -> dict:
    return next(r for r in _runs() if r["name"] == name)


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
    if run["lora"] is not None:
        file, scale = run["lora"]
        argv += ["--lora", f"{FIXTURES / 'lora' / file}:{scale}"]
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


def test_sample_py_runs_cover_every_sampler_for_each_kind():
    runs = _runs()
    from diffusion.samplers import SAMPLERS
    for kind in ("img2img", "inpaint9", "inpaint4"):
        assert {r["sampler"] for r in runs if r["name"].startswith(kind + "_")} == set(SAMPLERS), kind
    for kind in ("inpaint9", "inpaint4"):
        assert {r["strength"] == 1.0 for r in runs if r["name"].startswith(kind + "_")} == {True, False}, kind


# ------------------------------------------------------------------ with everything else
def test_run_record_names_the_pictures_and_repeats_the_run(tmp_path):
    """run_config.toml holds --init-img, --mask and the strength used; run_info.json their paths and sha256;
    `--config run_config.toml` repeats the run image for image."""
    from common.files import file_sha256
    run = _run("inpaint4_ddim4_s1")
    argv = _argv(run, SD_FOLDER, None, tmp_path / "a")
    argv[argv.index("--strength"):argv.index("--strength") + 2] = []          # the default, recorded
    first = sample.main(argv)
    record = (tmp_path / "a" / "run_config.toml").read_text()
    assert f'init-img = "{IMG / "init_48x32.png"}"' in record and f'mask = "{IMG / "mask_48x32.png"}"' in record
    assert "strength = 1.0" in record                   # inpainting's default, as diffusers'
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["init_image"] == {"path": str((IMG / "init_48x32.png").resolve()),
                                  "sha256": file_sha256(IMG / "init_48x32.png")}
    assert info["mask"]["sha256"] == file_sha256(IMG / "mask_48x32.png")
    again = sample.main(["--config", str(tmp_path / "a" / "run_config.toml"), "--outdir", str(tmp_path / "b")])
    assert [p.name for p in again] == [p.name for p in first]
    assert [Image.open(p).tobytes() for p in again[:2]] == [Image.open(p).tobytes() for p in first[:2]]


def test_n_iter_batches_are_the_next_seeds_and_the_grid_starts_with_the_picture(tmp_path):
    run = _run("img2img_euler_a5_s0.8")
    both = sample.main(_argv(run, SD_FOLDER, None, tmp_path / "both") + ["--n_iter", "2"])
    seed = run["seed"]
    alone = [sample.main([a if a != str(seed) else str(s) for a in _argv(run, SD_FOLDER, None, tmp_path / str(s))])
             for s in (seed, seed + 1)]
    assert [Image.open(p).tobytes() for p in both[:4]] == [Image.open(p).tobytes() for r in alone for p in r[:2]]
    grid = Image.open(both[4])
    assert grid.size == (3 * (48 + 2) + 2, 2 * (32 + 2) + 2)          # the picture, then 2 samples; 2 rows
    picture = load_image(IMG / "init_48x32.png")
    for row in range(2):
        cell = grid.crop((2, 2 + row * 34, 50, 34 + row * 34))
        assert cell.tobytes() == picture.tobytes(), "the first column is the init picture"
        cell = grid.crop((52, 2 + row * 34, 100, 34 + row * 34))
        assert cell.tobytes() == Image.open(both[2 * row]).tobytes()


def test_inpainting_grid_shows_the_repainted_region_grey(tmp_path):
    written = sample.main(_argv(_run("inpaint4_ddim4_s1"), SD_FOLDER, None, tmp_path))
    first = np.asarray(Image.open(written[-1]).crop((2, 2, 50, 34)))
    mask = mask_to_pixels(load_image(IMG / "mask_48x32.png"), 32, 48)[0, 0].numpy() >= 0.5
    assert (first[mask] == 128).all() and (first[~mask] == np.asarray(load_image(IMG / "init_48x32.png"))[~mask]).all()


def test_porting_trace_of_the_inpainting_unet(inpaint_checkpoints, tmp_path):
    """python -m porting trace of a 9-channel UNet: every module equal to diffusers' (1e-4 of its largest value),
    from the folder under diffusers' names and from the single file under LDM's (input_blocks.0 is conv_in, of
    9 input channels)."""
    from common.state_dict import read_safetensors
    from porting.__main__ import main as porting
    from porting.compare import compare, read_trace
    inputs = IMG / "inpaint_unet_trace_inputs.safetensors"
    reference = IMG / "inpaint_unet_trace_reference.safetensors"
    out = tmp_path / "folder.safetensors"
    assert porting(["trace", "--model", str(inpaint_checkpoints["folder"]), "--component", "unet",
                    "--inputs", str(inputs), "--out", str(out)]) == 0
    theirs, _ = read_trace(reference)
    ours, _ = read_trace(out)
    assert set(theirs) == set(ours)
    result = compare(reference, out, rtol=1e-4)
    assert not result.beyond, result.beyond[:5]
    single = tmp_path / "single.safetensors"
    assert porting(["trace", "--model", str(inpaint_checkpoints["single_file"]), "--component", "unet",
                    "--inputs", str(inputs), "--out", str(single), "--config",
                    str(inpaint_checkpoints["folder"])]) == 0
    ldm, _ = read_trace(single)
    assert read_safetensors(inputs)["sample"].shape[1] == 9
    torch.testing.assert_close(ldm["model.diffusion_model.input_blocks.0"], ours["conv_in"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ldm["model.diffusion_model.out"], ours["conv_out"], rtol=0, atol=1e-5)


def test_a_single_file_with_9_input_channels_is_an_inpainting_unet_from_its_shapes():
    """SD v1.5-inpainting's single file is SD v1.5's but for input_blocks.0.0.weight (320, 9, 3, 3): the
    config inferred from the shapes alone has 9 input channels and 4 output ones."""
    from diffusion.checkpoints.configs import configs_from_shapes
    manifest = json.loads((Path(__file__).parent / "manifests" / "sd_v1_single_file.json").read_text())
    shapes = {k: tuple(v) for k, v in manifest["model_tensors"].items()}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    unet, vae = configs_from_shapes(shapes, source="sd-v1-5-inpainting.ckpt")
    assert (unet.in_channels, unet.out_channels, vae.latent_channels) == (9, 4, 4)


# ------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_work(monkeypatch):
    import diffusion.checkpoints.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")
    monkeypatch.setattr(diffusion.checkpoints.load, "load_stable_diffusion", refuse)


def _refused(argv, capsys, *words) -> str:
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("extra, words", [
    (["--mask", str(IMG / "mask_48x32.png")], ["--mask", "needs --init-img"]),
    (["--strength", "0.5"], ["--strength 0.5", "give --init-img"]),
    (["--init-img", str(IMG / "init_48x32.png"), "--strength", "0"], ["--strength 0.0", "(0, 1]"]),
    (["--init-img", str(IMG / "init_48x32.png"), "--strength", "1.5"], ["--strength 1.5", "(0, 1]"]),
    (["--init-img", str(IMG / "init_48x32.png"), "--strength", "-0.2"], ["--strength -0.2", "(0, 1]"]),
    (["--init-img", str(IMG / "init_48x32.png"), "--strength", "nan"], ["--strength", "nan"]),
    (["--init-img", str(IMG / "init_48x32.png"), "--strength", "0.3"], ["--strength 0.3 with --ddim_steps 2",
                                                                         "0 steps"]),
    (["--init-img", str(IMG / "missing.png")], ["--init-img", "missing.png"]),
    (["--init-img", str(IMG / "schedulers.json")], ["--init-img", "schedulers.json", "not a readable image"]),
    (["--init-img", str(IMG / "init_48x32.png"), "--mask", str(IMG / "runs")], ["--mask", "runs"]),
])
def test_bad_input_is_one_line_before_any_model_loads(extra, words, tmp_path, capsys, no_model_work):
    argv = ["--ckpt", str(SD_FOLDER), "--outdir", str(tmp_path / "out"), "--ddim_steps", "2", "--device", "cpu"]
    _refused(argv + extra, capsys, *words)
    assert not (tmp_path / "out").exists(), "nothing is written"


def test_an_oversized_picture_is_refused_from_its_header(tmp_path, capsys, monkeypatch, no_model_work):
    monkeypatch.setattr("common.images.MAX_IMAGE_PIXELS", 48 * 32 - 1)
    _refused(["--ckpt", str(SD_FOLDER), "--outdir", str(tmp_path), "--init-img", str(IMG / "init_48x32.png")],
             capsys, "--init-img", "too large", "48x32")


def test_an_inpainting_unet_needs_a_mask(inpaint_checkpoints, tmp_path, capsys, no_model_work):
    _refused(["--ckpt", str(inpaint_checkpoints["folder"]), "--outdir", str(tmp_path)], capsys,
             "--ckpt", "an inpainting UNet (9 input channels", "--mask")
    _refused(["--ckpt", str(inpaint_checkpoints["single_file"]), "--config", str(inpaint_checkpoints["folder"]),
              "--outdir", str(tmp_path), "--init-img", str(IMG / "init_48x32.png")], capsys, "--mask")


def test_a_picture_size_the_unet_cannot_take_names_init_img(tmp_path, capsys, no_model_work):
    """45x30 rounds down to 44x28 (the VAE factor 4), not a multiple of 8 (the tiny UNet's)."""
    picture = tmp_path / "odd.png"
    load_image(IMG / "init_50x35.png").resize((45, 30)).save(picture)
    _refused(["--ckpt", str(SD_FOLDER), "--outdir", str(tmp_path / "out"), "--init-img", str(picture)], capsys,
             "--init-img", "45x30", "44x28", "--H and --W")


def test_generate_refuses_what_it_cannot_run():
    from diffusion.checkpoints.load import load_stable_diffusion
    from diffusion.pipeline import generate
    models = load_stable_diffusion(SD_FOLDER)
    picture = load_image(IMG / "init_48x32.png")
    with pytest.raises(ValueError, match="mask_image needs init_image"):
        generate(models, "a cat", mask_image=picture, seed=0, steps=2)
    with pytest.raises(ValueError, match=r"strength=1.5: must be in \(0, 1\]"):
        generate(models, "a cat", init_image=picture, strength=1.5, seed=0, steps=2)
    with pytest.raises(ValueError, match="strength applies to image to image"):
        generate(models, "a cat", strength=0.5, seed=0, steps=2)


# ------------------------------------------------------------------ docs/sampling.md's measurement
def test_sdedit_measurement_checks_what_it_says(tmp_path):
    """world/sdedit.py on the embedded model, 1 seed and 4 steps: a row per edit and strength and per mask, the
    masks black on the object (grown by the margin), and the judge reading change and rest apart."""
    from world.scene import draw
    from world.sdedit import EDITS, MASK_MARGINS, PICTURE, judge, main, object_mask
    tight, grown = (np.asarray(object_mask(PICTURE, m))[..., 0] for m in MASK_MARGINS)
    assert set(np.unique(tight)) == {0, 255} and (grown == 0).sum() > (tight == 0).sum()
    assert (tight == 0).sum() == pytest.approx(26 * 26, rel=0.25)          # the large square, 26 px a side
    picture = np.asarray(draw(PICTURE))
    assert judge(picture, PICTURE, "colour", "red") == (True, True)
    assert judge(picture, PICTURE, "colour", "yellow") == (False, True)
    main(["--seeds", "1", "--steps", "4", "--strengths", "0.5", "1.0", "--json", str(tmp_path / "rows.jsonl"),
          "--picture", str(tmp_path / "sheet.png")])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["edit"], r["strength"]) for r in rows] == [
        *((e, s) for e in EDITS for s in (0.5, 1.0)), *((f"inpainting, margin {m}", 1.0) for m in MASK_MARGINS)]
    assert Image.open(tmp_path / "sheet.png").size[0] == 3 * (64 * 2 + 4) + 4


@pytest.mark.parametrize("name", ["img2img_euler_a5_s0.8", "inpaint4_ddim5_eta0.7_s0.6", "inpaint9_dpmpp_2m5_s1"])
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_half_precision_runs_stay_near_the_fp32_references(name, precision, inpaint_checkpoints, tmp_path):
    """bf16 weights (the latents, the mask and the kept latents in bf16, as diffusers' torch_dtype) and fp32
    weights under autocast run every kind end to end. Compared in fp32 only (no per-CPU-kind half fixtures
    here): measured on AVX512+bf16, mean |diff| to diffusers' fp32 images 1.0-2.5/255, max 7-25/255."""
    run = _run(name)
    ckpt = inpaint_checkpoints["folder"] if run["unet"] == "inpaint" else SD_FOLDER
    written = sample.main(_argv(run, ckpt, None, tmp_path) + ["--precision", precision])
    for path, file in zip(written, run["images"]):
        diff = np.abs(np.asarray(Image.open(path)).astype(int) - np.asarray(Image.open(RUNS / file)).astype(int))
        assert diff.mean() <= 4, f"{name} {precision}: mean |diff| {diff.mean():.2f}/255 from the fp32 image"
