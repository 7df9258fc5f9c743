"""SDXL against diffusers, transformers and open_clip, on tools/make_reference_sdxl.py's tiny random SDXL-shaped
checkpoint (tests/fixtures/sdxl/: a diffusers folder and the same weights in sgm's single-file layout), and the
real SDXL base files' key manifests.

- the text encoders: StableDiffusionXLPipeline.encode_prompt's concatenated penultimate states and pooled
  embedding from both layouts (and open_clip's own tower, run as sgm runs it, from the single file);
- the UNet (per-level transformer depth, no attention at the first level, the text_time micro-conditioning)
  within 1e-5 of diffusers' from both layouts;
- sample.py's images within 2/255 of StableDiffusionXLPipeline with every sampler's diffusers scheduler, the
  micro-conditioning flags, a negative prompt, an empty one, no guidance and the config's default size;
- the real SDXL base names and shapes: every key mapped both ways, the configs inferred from a single file's
  shapes equal the published ones;
- bf16 weights loaded in bf16 stay views of the file's pages (no copies), from both layouts;
- bad input: one line, exit 2, before sampling.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from clip.text_model import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from clip.weights import (SDXL_OPENCLIP_PREFIX, fuse_in_proj, openclip_table, source_table, split_in_proj,
                          text_encoder_state_dict, transpose_projection, untranspose_projection)
from common.state_dict import CheckpointError, check_keys, read_safetensors, rename, write_safetensors
from diffusion.checkpoints import single_file
from diffusion.checkpoints.configs import configs_from_shapes
from diffusion.checkpoints.load import load_stable_diffusion, load_unet_folder, load_unet_single_file
from diffusion.models.unet import UNet2DConditionModel, UNetConfig
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.pipeline import encode_prompts_sdxl, micro_conditioning

FIXTURES = Path(__file__).parent / "fixtures"
SDXL = FIXTURES / "sdxl"
FOLDER, SINGLE = SDXL / "tiny_diffusers", SDXL / "tiny_single.safetensors"
PUBLIC = FIXTURES / "public_configs" / "stabilityai--stable-diffusion-xl-base-1.0"
MANIFESTS = Path(__file__).parent / "manifests"
REF = read_safetensors(SDXL / "reference.safetensors")
META = json.loads((SDXL / "reference.json").read_text())
MAX_DIFF = 2   # out of 255

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_reference_was_made_from_these_fixtures():
    for name, digest in META["sha256"].items():
        assert hashlib.sha256((SDXL / name).read_bytes()).hexdigest() == digest, (
            f"{SDXL / name} changed since the references were made: rerun tools/make_reference_sdxl.py")


@pytest.fixture(scope="module")
def folder_models():
    return load_stable_diffusion(FOLDER)


@pytest.fixture(scope="module")
def single_models():
    return load_stable_diffusion(SINGLE, config_dir=FOLDER)


@pytest.fixture(params=["folder", "single_file"])
def models(request, folder_models, single_models):
    return folder_models if request.param == "folder" else single_models


# ---- the text encoders ----------------------------------------------------------------------------
def test_both_layouts_load_as_sdxl(models):
    assert models.is_sdxl and models.force_zeros_for_empty_prompt
    assert isinstance(models.text_encoder_2, CLIPTextModelWithProjection)
    assert type(models.text_encoder) is CLIPTextModel and models.text_encoder.config.hidden_act == "quick_gelu"
    assert models.text_encoder_2.config.hidden_act == "gelu" and models.text_encoder_2.config.projection_dim == 48
    assert models.tokenizer.pad_token_id != 0 and models.tokenizer_2.pad_token_id == 0   # "!" pads the second
    assert models.unet.config == UNetConfig.from_json(FOLDER / "unet" / "config.json")
    assert models.vae.config.scaling_factor == 0.13025 and models.vae.config.force_upcast
    assert models.scheduler_config["timestep_spacing"] == "leading"


def test_text_states_and_pooled_embedding_equal_diffusers_encode_prompt(models):
    prompts = META["text"]["prompts"]
    with torch.no_grad():
        states, pooled = encode_prompts_sdxl(models.text_encoders, (models.tokenizer, models.tokenizer_2), prompts,
                                             torch.device("cpu"))
        negative, negative_pooled = encode_prompts_sdxl(models.text_encoders, (models.tokenizer, models.tokenizer_2),
                                                        [""] * 2, torch.device("cpu"))
    assert states.shape == (2, 77, 96) and pooled.shape == (2, 48)
    assert (states - REF["text.states"]).abs().max() <= 1e-5
    assert (pooled - REF["text.pooled"]).abs().max() <= 1e-5
    # open_clip's own tower, as sgm's FrozenOpenCLIPEmbedder2 runs it (penultimate, projected pooled)
    assert (states[..., 32:] - REF["text.open_clip_penultimate"]).abs().max() <= 1e-5
    assert (pooled - REF["text.open_clip_pooled"]).abs().max() <= 1e-5
    # force_zeros_for_empty_prompt: diffusers' unconditional half is zeros, not the encoded ""
    assert not REF["text.negative_states"].any() and not REF["text.negative_pooled"].any()
    assert negative.abs().max() > 0 and negative_pooled.abs().max() > 0


def test_the_projection_is_read_transposed_and_written_back():
    tower = {k: v for k, v in read_safetensors(SINGLE).items() if k.startswith(SDXL_OPENCLIP_PREFIX)}
    ours = text_encoder_state_dict(tower, source="single")
    assert torch.equal(ours["text_projection.weight"], tower[SDXL_OPENCLIP_PREFIX + "text_projection"].t())
    back = untranspose_projection(fuse_in_proj(rename(ours, openclip_table(5, SDXL_OPENCLIP_PREFIX), reverse=True)))
    assert set(back) == set(tower) - {SDXL_OPENCLIP_PREFIX + "logit_scale"}
    assert all(torch.equal(back[k], tower[k]) for k in back)
    assert set(transpose_projection(split_in_proj(tower))) >= {SDXL_OPENCLIP_PREFIX + "text_projection#T"}


# ---- the UNet --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_unet_equals_diffusers(layout):
    config = UNetConfig.from_json(FOLDER / "unet" / "config.json")
    if layout == "folder":
        unet = load_unet_folder(FOLDER)
    else:
        unet_t = read_safetensors(SINGLE, keys=lambda k: k.startswith(single_file.UNET_PREFIX))
        unet = load_unet_single_file(unet_t, config, source=str(SINGLE))    # label_emb.0.{0,2}: add_embedding
    assert config.addition_embed_type == "text_time" and config.transformer_layers_per_block == (1, 2)
    assert unet.down_blocks[0].attentions is None and len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 2 and len(unet.up_blocks[0].attentions[0].transformer_blocks) == 2
    with torch.no_grad():
        out = unet.eval()(REF["unet.sample"], REF["unet.t"], REF["unet.context"],
                          text_embeds=REF["unet.text_embeds"], time_ids=REF["unet.time_ids"])
        assert (out - REF["unet.out"]).abs().max() <= 1e-5
        # the micro-conditioning is read: other sizes give another prediction
        other = unet(REF["unet.sample"], REF["unet.t"], REF["unet.context"], text_embeds=REF["unet.text_embeds"],
                     time_ids=REF["unet.time_ids"].flip(0))
    assert (other - REF["unet.out"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="micro-conditioning"):
        unet(REF["unet.sample"], REF["unet.t"], REF["unet.context"])


def test_micro_conditioning_defaults_as_the_pipeline():
    assert micro_conditioning(1024, 768).tolist() == [1024, 768, 0, 0, 1024, 768]
    assert micro_conditioning(64, 64, original_size=(512, 384), crops_coords_top_left=(16, 8),
                              target_size=(1024, 1024)).tolist() == [512, 384, 16, 8, 1024, 1024]


# ---- the real SDXL base files -----------------------------------------------------------------------
SINGLE_MANIFEST = json.loads((MANIFESTS / "sdxl_base_single_file.json").read_text())["model_tensors"]
FOLDER_MANIFEST = json.loads((MANIFESTS / "sdxl_base_diffusers.json").read_text())["files"]


def _fake(shapes: dict) -> dict:
    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_the_public_configs_are_the_presets():
    assert UNetConfig.from_json(PUBLIC / "unet" / "config.json") == UNetConfig.sdxl()
    assert VAEConfig.from_json(PUBLIC / "vae" / "config.json") == VAEConfig.sdxl()
    assert CLIPTextConfig.from_json(PUBLIC / "text_encoder" / "config.json") == CLIPTextConfig.vit_l14()
    assert CLIPTextConfig.from_json(PUBLIC / "text_encoder_2" / "config.json") == CLIPTextConfig.open_clip_vit_bigg14()


def test_every_unet_tensor_of_the_real_files_maps_onto_our_model_both_ways():
    with torch.device("meta"):
        unet = UNet2DConditionModel(config=UNetConfig.sdxl())
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684   # SDXL base's UNet, as published
    table = single_file.unet_table(unet.config)
    unet_t = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith(single_file.UNET_PREFIX)}
    check_keys(_shapes(unet), {k: tuple(v.shape) for k, v in rename(_fake(unet_t), table).items()}, source="single UNet")
    check_keys({k: tuple(v) for k, v in unet_t.items()},
               {k: tuple(v.shape) for k, v in rename(unet.state_dict(), table, reverse=True).items()}, source="back")
    check_keys(_shapes(unet), {k: tuple(v) for k, v in FOLDER_MANIFEST["unet/diffusion_pytorch_model.safetensors"].items()},
               source="folder UNet")


def test_every_vae_and_text_tensor_of_the_real_files_maps_onto_our_models():
    with torch.device("meta"):
        vae = AutoencoderKL(config=VAEConfig.sdxl())
        text, text_2 = CLIPTextModel(CLIPTextConfig.vit_l14()), CLIPTextModelWithProjection(CLIPTextConfig.open_clip_vit_bigg14())
    vae_t = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith(single_file.VAE_PREFIX)}
    check_keys(_shapes(vae), {k: tuple(v.shape) for k, v in single_file.vae_attention_as_linear(
        rename(_fake(vae_t), single_file.vae_table(vae.config))).items()}, source="single VAE")
    for model, prefix, part in ((text, single_file.SDXL_CLIP_PREFIX, "text_encoder"),
                                (text_2, single_file.SDXL_OPENCLIP_PREFIX, "text_encoder_2")):
        projection = part == "text_encoder_2"
        for name, shapes in (("single file", {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith(prefix)}),
                             ("folder", FOLDER_MANIFEST[f"{part}/model.safetensors"])):
            ours = text_encoder_state_dict(_fake(shapes), source=name, with_projection=projection)
            check_keys(_shapes(model), {k: tuple(v.shape) for k, v in ours.items()}, source=f"{name} {part}")
            # and back: our names under the file's, every tensor the file holds but the ones dropped
            table = source_table(shapes, num_layers=model.config.num_hidden_layers)
            back = rename(dict(model.state_dict()), table, reverse=True)
            back = untranspose_projection(fuse_in_proj(back)) if name == "single file" and projection else back
            kept = {k for k in shapes if not table.drops(k) and not k.endswith("logit_scale")}
            assert set(back) == kept, (name, part, sorted(set(back) ^ kept)[:5])
    assert sum(p.numel() for p in text_2.parameters()) == 694_659_840


def test_the_single_files_configs_are_inferred_as_the_published_ones():
    unet, vae = configs_from_shapes({k: tuple(v) for k, v in SINGLE_MANIFEST.items()}, source="sd_xl_base_1.0.safetensors")
    assert unet == UNetConfig.sdxl() and vae == VAEConfig.sdxl()


# ---- whole images: sample.py against StableDiffusionXLPipeline ------------------------------------
RUNS = META["pipeline"]


def _argv(run: dict, layout: str, out: Path) -> list[str]:
    ckpt = ["--ckpt", str(FOLDER)] if layout == "folder" else ["--ckpt", str(SINGLE), "--config", str(FOLDER)]
    argv = [*ckpt, "--outdir", str(out), "--prompt", run["prompt"], "--n_samples", str(run["num_images_per_prompt"]),
            "--ddim_steps", str(run["steps"]), "--scale", str(run["guidance_scale"]), "--seed", str(run["seed"]),
            "--device", "cpu", "--sampler", run["sampler"]]
    if run["height"] is not None:
        argv += ["--H", str(run["height"]), "--W", str(run["width"])]
    if run["negative_prompt"] is not None:
        argv += ["--negative_prompt", run["negative_prompt"]]
    for name, value in run["micro_conditioning"].items():
        argv += [f"--{name}", *map(str, value)]
    return argv


@pytest.mark.parametrize("layout", ["folder", "single_file"])
@pytest.mark.parametrize("run", RUNS, ids=[r["name"] for r in RUNS])
def test_sample_py_equals_diffusers(run, layout, tmp_path, capsys):
    written = sample.main(_argv(run, layout, tmp_path))
    n = run["num_images_per_prompt"]
    for i, path in enumerate(written[:n]):
        ours = np.asarray(Image.open(path)).astype(int)
        theirs = np.asarray(Image.open(SDXL / "pipeline" / run["images"][i])).astype(int)
        assert ours.shape == theirs.shape, f"{run['name']} ({layout}): {ours.shape} != {theirs.shape}"
        diff = np.abs(ours - theirs).max()
        assert diff <= MAX_DIFF, f"{run['name']} ({layout}) image {i}: max |diff| {diff}/255"


def test_the_micro_conditioning_changes_the_image(tmp_path, capsys):
    """The flags reach the UNet: the micro-conditioned run without its flags is another image."""
    run = next(r for r in RUNS if r["micro_conditioning"])
    written = sample.main(_argv({**run, "micro_conditioning": {}}, "folder", tmp_path))
    ours = np.asarray(Image.open(written[0])).astype(int)
    theirs = np.asarray(Image.open(SDXL / "pipeline" / run["images"][0])).astype(int)
    assert np.abs(ours - theirs).max() > MAX_DIFF


def test_an_fp16_vae_decodes_in_fp32_as_force_upcast_says(folder_models):
    from diffusion.pipeline import decode_to_uint8
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = folder_models.vae
    want = decode_to_uint8(vae, latents)
    vae.half()
    try:
        got = decode_to_uint8(vae, latents, upcast=True)
        assert next(vae.parameters()).dtype == torch.float16          # put back
    finally:
        vae.float()
    assert torch.equal(got, decode_to_uint8(vae.half().float(), latents))   # fp32 numbers of the fp16 weights
    assert (got.int() - want.int()).abs().max() <= MAX_DIFF


# ---- bf16 weights stay on the file's pages (issue 35 item 4) ----------------------------------------
def _in_bf16(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny folder and single file with every floating tensor cast to bf16, as a bf16 SDXL is saved."""
    def cast(path: Path, to: Path) -> None:
        write_safetensors(to, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                               for k, v in read_safetensors(path).items()})
    folder = tmp_path / "bf16_diffusers"
    shutil.copytree(FOLDER, folder)
    for path in folder.rglob("*.safetensors"):
        cast(path, path)
    cast(SINGLE, tmp_path / "bf16_single.safetensors")
    return folder, tmp_path / "bf16_single.safetensors"


PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _tensors(models, part: str) -> dict[str, torch.Tensor]:
    module = getattr(models, part)
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if t.numel()}


def _off_the_files_pages(models, under: Path) -> dict[str, list[str]]:
    """Each part's parameters and buffers that lie in no mapping of a .safetensors file under `under`
    (/proc/self/maps)."""
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps
             if m[-1].endswith(".safetensors") and m[-1].startswith(str(under.resolve()))]
    return {part: [name for name, t in _tensors(models, part).items()
                   if not any(lo <= t.data_ptr() < hi for lo, hi in spans)] for part in PARTS}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_bf16_weights_load_as_views_of_the_file(layout, tmp_path):
    """A bf16 SDXL loaded in bf16 holds no copy of its weights: every parameter and buffer of the four models
    (the single file's split in_proj and transposed text_projection included) lies on the file's own pages,
    as read_safetensors maps them (tests/test_state_dict.py), so the full-size model's 6.9 GB cost RAM
    once (bench/sample.py --model sdxl; docs/sdxl.md "Speed and memory"). Loaded in fp32, every one is a copy."""
    folder, single = _in_bf16(tmp_path)
    path, config_dir = (folder, None) if layout == "folder" else (single, folder)
    models = load_stable_diffusion(path, config_dir=config_dir, dtype=torch.bfloat16)
    assert next(models.unet.parameters()).dtype == torch.bfloat16
    assert _off_the_files_pages(models, tmp_path) == {part: [] for part in PARTS}
    converted = load_stable_diffusion(path, config_dir=config_dir, dtype=torch.float32)
    assert _off_the_files_pages(converted, tmp_path) == {part: list(_tensors(converted, part)) for part in PARTS}


# ---- bad input: one line, exit 2, before sampling ---------------------------------------------------
def test_an_sdxl_refiner_single_file_is_refused_by_name(tmp_path, sample_refusal, no_sampling):
    """The refiner's one tower is OpenCLIP's at conditioner.embedders.0.model.*."""
    tensors = read_safetensors(SINGLE)
    refiner = {k.replace(SDXL_OPENCLIP_PREFIX, "conditioner.embedders.0.model."): v for k, v in tensors.items()
               if not k.startswith(single_file.SDXL_CLIP_PREFIX)}
    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    write_safetensors(path, refiner)
    message = sample_refusal(["--ckpt", str(path), "--config", str(FOLDER), "--outdir", str(tmp_path / "out")])
    assert "SDXL's refiner" in message and str(path) in message
    with pytest.raises(CheckpointError, match="SDXL's refiner"):
        load_stable_diffusion(path, config_dir=FOLDER)


def test_an_sdxl_refiner_folder_is_refused_by_name(tmp_path, no_sampling):
    folder = tmp_path / "refiner"
    shutil.copytree(FOLDER, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="SDXL's refiner"):
        load_stable_diffusion(folder)


@pytest.mark.parametrize("flag", [["--original_size", "512", "512"], ["--crops_coords_top_left", "0", "8"],
                                  ["--target_size", "64", "64"]])
def test_micro_conditioning_flags_on_sd_v1_are_refused(flag, tmp_path, sample_refusal, no_sampling):
    sd1 = FIXTURES / "sd" / "tiny_diffusers"
    message = sample_refusal(["--ckpt", str(sd1), "--outdir", str(tmp_path), *flag])
    assert flag[0] in message and "SD v1 or 2.x" in message


def test_image_to_image_on_sdxl_is_refused_by_name(tmp_path, sample_refusal, no_sampling):
    """StableDiffusionXLImg2ImgPipeline and its inpainting twin are not proven here: refused before loading."""
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(picture)
    message = sample_refusal(["--ckpt", str(FOLDER), "--outdir", str(tmp_path / "out"), "--init-img", str(picture)])
    assert f"--init-img {picture}" in message and "is SDXL" in message
    assert not (tmp_path / "out").exists()


def test_a_negative_crop_is_refused(tmp_path, sample_refusal, no_sampling):
    message = sample_refusal(["--ckpt", str(FOLDER), "--outdir", str(tmp_path), "--crops_coords_top_left", "-1", "0"])
    assert "--crops_coords_top_left -1 0" in message


def test_sdxl_parts_beside_another_models_are_refused(tmp_path, sample_refusal, no_sampling):
    """SD v1's text encoder in an SDXL folder: the widths do not add up to the UNet's cross-attention."""
    folder = tmp_path / "mixed"
    shutil.copytree(FOLDER, folder)
    shutil.rmtree(folder / "text_encoder_2")
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"], index["tokenizer_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    message = sample_refusal(["--ckpt", str(folder), "--outdir", str(tmp_path / "out")])
    assert "32 wide" in message and "96-wide" in message


# ---- LoRA files on SDXL: kohya's SDXL names and diffusers', against load_lora_weights ---------------
LORA = META["lora"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_an_sdxl_lora_gives_diffusers_outputs(fmt, layout):
    from diffusion.checkpoints.lora_files import load_lora_files
    models = load_stable_diffusion(FOLDER) if layout == "folder" else load_stable_diffusion(SINGLE, config_dir=FOLDER)
    changed, skipped = load_lora_files(models, [(str(SDXL / f"{fmt}_lora.safetensors"), 1.0)], fuse=False)
    assert changed == {"unet", "text_encoder", "text_encoder_2"} and not skipped
    from diffusion import lora
    assert {part: len(lora.lora_layers(getattr(models, part))) for part in changed} == LORA["modules"]
    with torch.no_grad():
        out = models.unet(REF["lora.unet.sample"], torch.tensor([500.0]), REF["lora.unet.context"],
                          text_embeds=REF["lora.unet.text_embeds"], time_ids=REF["lora.unet.time_ids"])
        states, pooled = encode_prompts_sdxl(models.text_encoders, (models.tokenizer, models.tokenizer_2), ["a dog"],
                                             torch.device("cpu"))
    assert (out - REF[f"lora.{fmt}.unet.out"]).abs().max() <= 1e-4
    assert (states - REF[f"lora.{fmt}.text.states"]).abs().max() <= 1e-4
    assert (pooled - REF[f"lora.{fmt}.text.pooled"]).abs().max() <= 1e-4


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sample_py_with_an_sdxl_lora_equals_diffusers_fuse_lora(fmt, tmp_path, capsys):
    run = LORA["run"]
    written = sample.main(["--ckpt", str(FOLDER), "--outdir", str(tmp_path), "--prompt", run["prompt"], "--n_samples", "1",
                           "--ddim_steps", str(run["num_inference_steps"]), "--scale", str(run["guidance_scale"]),
                           "--H", str(run["height"]), "--W", str(run["width"]), "--seed", str(run["seed"]),
                           "--sampler", run["sampler"], "--device", "cpu",
                           "--lora", f"{SDXL / f'{fmt}_lora.safetensors'}:{run['scale']}"])
    ours = np.asarray(Image.open(written[0])).astype(int)
    assert np.abs(ours - REF[f"lora.{fmt}.image"].numpy().astype(int)).max() <= MAX_DIFF


def test_a_kohya_sd_v1_lora_on_sdxl_is_refused_naming_the_file(tmp_path, sample_refusal, no_sampling):
    """kohya's SD v1 text-encoder names (lora_te_...) match nothing of SDXL's (lora_te1_/lora_te2_)."""
    tensors = read_safetensors(SDXL / "kohya_lora.safetensors")
    sd1_names = {k.replace("lora_te1_", "lora_te_"): v for k, v in tensors.items() if k.startswith("lora_te1_")}
    path = tmp_path / "sd15_kohya.safetensors"
    write_safetensors(path, sd1_names)
    message = sample_refusal(["--ckpt", str(FOLDER), "--outdir", str(tmp_path / "out"), "--lora", str(path)])
    assert str(path) in message and "match no module of this model" in message and "lora_te_text_model" in message


# ---- the porter's kit: traces under the checkpoint's names -------------------------------------------
def test_the_sdxl_components_trace_under_the_checkpoints_names():
    """The single file's UNet under sgm's names (label_emb, the 2-deep transformers) and its towers under
    conditioner.embedders.N names hold the folder's numbers under diffusers'/transformers' names."""
    from porting.components import load_component
    from porting.trace import trace
    g = torch.Generator().manual_seed(0)
    unet_in = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([411.0]),
               "encoder_hidden_states": torch.randn(1, 7, 96, generator=g), "text_embeds": torch.randn(1, 48, generator=g),
               "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    single, folder = load_component(SINGLE, "unet", config_dir=FOLDER), load_component(FOLDER, "unet")
    assert (single.layout, folder.layout) == ("sdxl-ldm-unet", "sdxl-diffusers-unet")
    sgm, ours = trace(single, unet_in), trace(folder, unet_in)
    p = "model.diffusion_model."
    for theirs, mine in {"label_emb.0.2": "add_embedding.linear_2", "input_blocks.4.1.transformer_blocks.1":
                         "down_blocks.1.attentions.0.transformer_blocks.1", "middle_block.2": "mid_block.resnets.1",
                         "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv", "out.2": "conv_out"}.items():
        torch.testing.assert_close(sgm[p + theirs], ours[mine], rtol=0, atol=1e-6, msg=theirs)
    ids = {"input_ids": torch.tensor([[1, 5, 9, 300, 2], [1, 7, 7, 2, 2]])}
    for name, prefix, block in (("text_encoder", "conditioner.embedders.0.transformer.text_model.", "encoder.layers.4"),
                                ("text_encoder_2", "conditioner.embedders.1.model.", "transformer.resblocks.4")):
        single, folder = load_component(SINGLE, name, config_dir=FOLDER), load_component(FOLDER, name)
        from_file, from_folder = trace(single, ids), trace(folder, ids)
        theirs = prefix + block
        mine = "text_model.encoder.layers.4" if any(k.startswith("text_model.") for k in from_folder) else "encoder.layers.4"
        assert theirs in from_file and mine in from_folder, (sorted(from_file)[:3], sorted(from_folder)[:3])
        torch.testing.assert_close(from_file[theirs], from_folder[mine], rtol=0, atol=1e-6)


def test_train_dreambooth_refuses_sdxl_full_fine_tuning_by_name(tmp_path, capsys):
    """Without --rank: SDXL trains as a LoRA only; the one line says so and what full fine-tuning would hold."""
    import train_dreambooth
    data = tmp_path / "instance"
    data.mkdir()
    Image.new("RGB", (40, 40), (200, 40, 40)).save(data / "0.png")
    argv = ["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", str(data), "--instance_prompt",
            "a photo of sks dog", "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--max_train_steps", "1"]
    try:
        code = train_dreambooth.main(argv)
    except SystemExit as e:
        code = e.code
    text = capsys.readouterr().err
    assert code == 2 and "an SDXL model" in text and len(text.strip().splitlines()) == 1
    assert "--rank 4" in text and "GB of fp32 weights, gradients and AdamW moments" in text
    assert not (tmp_path / "out" / "unet").exists()
