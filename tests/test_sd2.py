"""Stable Diffusion 2.x against diffusers, transformers and open_clip, on tools/make_reference_sd2.py's tiny
random SD 2-shaped checkpoint (tests/fixtures/sd2/: a diffusers folder and the same weights as an LDM single
file with OpenCLIP's text tower), and the real SD 2.1 files' key manifests.

- the text encoder: transformers' states from the folder, open_clip's penultimate states (SD 2's own
  conditioning) from the single file, within 1e-5; the tokenizer padding with "!" (id 0) as transformers'
  SD 2 tokenizer;
- the UNet (Linear projections, heads per level, upcast attention) within 1e-5 of diffusers' from both
  layouts; upcast attention in half precision;
- sample.py's images within 2/255 of StableDiffusionPipeline with v-prediction (DDIM, DPM++ 2M, the
  config's default size), from the folder and from the single file;
- the real SD 2.1 names and shapes: every key mapped, the configs inferred from a single file's shapes;
- bad input: one line, exit 2, before sampling.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from clip.text_model import CLIPTextConfig, CLIPTextModel
from clip.tokenizer import SD2_PAD_TOKEN, CLIPTokenizer
from clip.weights import (OPENCLIP_PREFIX, config_from_state_dict, fuse_in_proj, load_text_encoder, openclip_table,
                          split_in_proj, text_encoder_state_dict)
from common.state_dict import CheckpointError, check_keys, read_safetensors, rename, write_safetensors
from diffusion.checkpoints import single_file
from diffusion.checkpoints.configs import configs_from_shapes, read_configs
from diffusion.checkpoints.load import load_stable_diffusion, load_unet_folder, load_unet_single_file
from diffusion.models.attention import Attention
from diffusion.models.unet import SD_V2_BASE, UNet2DConditionModel, UNetConfig
from diffusion.models.vae import VAEConfig

FIXTURES = Path(__file__).parent / "fixtures"
SD2 = FIXTURES / "sd2"
FOLDER, SINGLE = SD2 / "tiny_diffusers", SD2 / "tiny_single.safetensors"
PUBLIC = FIXTURES / "public_configs" / "stabilityai--stable-diffusion-2-1"
MANIFESTS = Path(__file__).parent / "manifests"
REF = read_safetensors(SD2 / "reference.safetensors")
META = json.loads((SD2 / "reference.json").read_text())
MAX_DIFF = 2   # out of 255

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_reference_was_made_from_these_fixtures():
    import hashlib
    for name, digest in META["sha256"].items():
        assert hashlib.sha256((SD2 / name).read_bytes()).hexdigest() == digest, (
            f"{SD2 / name} changed since the references were made: rerun tools/make_reference_sd2.py")


# ---- the text encoder --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_text_states_equal_transformers_and_open_clips_penultimate(layout):
    config = CLIPTextConfig.from_json(FOLDER / "text_encoder" / "config.json")
    model = (load_text_encoder(FOLDER / "text_encoder") if layout == "folder"
             else load_text_encoder(SINGLE, config=config))                       # the cond_stage_model.model.* tower
    assert model.config == config and config.hidden_act == "gelu" and config.num_hidden_layers == 2
    with torch.no_grad():
        states = model(REF["text.ids"]).last_hidden_state
    reference = REF["text.transformers" if layout == "folder" else "text.open_clip"]
    assert (states - reference).abs().max() <= 1e-5


def test_the_tokenizer_pads_with_bang_as_transformers_sd2_tokenizer():
    expected = META["tokenizer"]
    shipped = CLIPTokenizer.from_pretrained(None, pad_token=SD2_PAD_TOKEN)       # what an SD 2 single file gets
    assert shipped.pad_token_id == expected["pad_token_id"] == 0
    assert shipped(expected["prompts"]).tolist() == expected["input_ids"]
    folder = CLIPTokenizer.from_pretrained(FOLDER / "tokenizer")                 # the folder's own tokenizer/
    assert folder.pad_token_id == 0 and folder(["a cat!"])[0, :6].tolist()[-2:] == [0, folder.eos_token_id]
    with pytest.raises(ValueError, match="only for the shipped vocabulary"):
        CLIPTokenizer.from_pretrained(FOLDER / "tokenizer", pad_token="!")


def test_split_and_fuse_in_proj_are_inverses():
    tensors = {k: v for k, v in read_safetensors(SINGLE).items() if k.startswith(OPENCLIP_PREFIX)}
    split = split_in_proj(tensors)
    key = OPENCLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"
    assert torch.equal(split[key + "#k"], tensors[key][32:64]) and key not in split
    back = fuse_in_proj(split)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(CheckpointError, match=r"in_proj_weight: its .*#v part is missing"):
        fuse_in_proj({k: v for k, v in split.items() if k != key + "#v"})


# ---- the real SD 2.1 names and shapes ---------------------------------------------------------------
def _fake(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


SINGLE_MANIFEST = json.loads((MANIFESTS / "sd_v2_single_file.json").read_text())["model_tensors"]
FOLDER_MANIFEST = json.loads((MANIFESTS / "sd_v2_diffusers.json").read_text())["files"]


def test_every_text_tensor_of_the_real_files_maps_onto_our_model():
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig.open_clip_vit_h14())
    single_text = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith("cond_stage_model.")}
    for name, shapes in (("single file", single_text), ("folder", FOLDER_MANIFEST["text_encoder/model.safetensors"])):
        ours = text_encoder_state_dict(_fake(shapes), source=name)
        check_keys(_shapes(text), {k: tuple(v.shape) for k, v in ours.items()}, source=f"{name} text encoder")
        assert config_from_state_dict(ours, openclip=name == "single file").num_hidden_layers == 23
    assert config_from_state_dict(text_encoder_state_dict(_fake(single_text), source="x"), openclip=True) \
        == CLIPTextConfig.open_clip_vit_h14() == CLIPTextConfig.from_json(PUBLIC / "text_encoder" / "config.json")
    # what is left out of the single file: the last block, the projection and the temperature
    table = openclip_table(23)
    dropped = sorted(k for k in split_in_proj(single_text) if table.drops(k))
    # block 23's 12 tensors (its in_proj weight and bias each split in three: 16 names), and 2 more
    assert len(dropped) == 16 + 2 and f"{OPENCLIP_PREFIX}logit_scale" in dropped


def test_a_single_file_written_by_diffusers_converter_has_only_the_blocks_used():
    """scripts/convert_diffusers_to_original_stable_diffusion.py writes 23 blocks and no text_projection."""
    shapes = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith("cond_stage_model.")
              and ".resblocks.23." not in k and not k.endswith(("text_projection", "logit_scale"))}
    ours = text_encoder_state_dict(_fake(shapes), source="converted")
    assert config_from_state_dict(ours, openclip=True).num_hidden_layers == 23


def test_a_vit_h_tower_missing_its_last_blocks_is_refused():
    """ViT-H/14's width says the depth: a tower of fewer blocks is refused, not read as a shallower model."""
    shapes = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith("cond_stage_model.")
              and not any(f".resblocks.{i}." in k for i in range(20, 24))}
    with pytest.raises(CheckpointError, match=r"lacks blocks: it holds blocks 0\.\.19 and its text_projection, "
                                              r"which give 19 layers; SD 2 runs 23"):
        text_encoder_state_dict(_fake(shapes), source="v2.safetensors")


# ---- the UNet ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_unet_equals_diffusers(layout):
    config = UNetConfig.from_json(FOLDER / "unet" / "config.json")
    if layout == "folder":
        unet = load_unet_folder(FOLDER)
    else:
        unet_t = read_safetensors(SINGLE, keys=lambda k: k.startswith(single_file.UNET_PREFIX))
        unet = load_unet_single_file(unet_t, config, source=str(SINGLE))     # proj_in: (C, C) Linear weights in LDM
    assert unet.config == config and config.use_linear_projection and config.upcast_attention
    assert config.attention_head_dim == (2, 4)
    transformer = unet.down_blocks[0].attentions[0]
    assert isinstance(transformer.proj_in, torch.nn.Linear) and transformer.transformer_blocks[0].attn1.heads == 2
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn2.heads == 4
    with torch.no_grad():
        out = unet.eval()(REF["unet.sample"], REF["unet.t"], REF["unet.context"])
    assert (out - REF["unet.out"]).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_attention_computes_in_fp32_under_half_precision(dtype):
    """upcast_attention: the half-precision result is the fp32 attention of the same (rounded) q, k, v, rounded
    once, whichever kernel scaled_dot_product_attention picks (torch's fused CPU kernel already accumulates
    in fp32, and gives these bits without the flag too; its math fallback would not)."""
    torch.manual_seed(0)
    attention = Attention(query_dim=16, context_dim=None, heads=2, head_dim=8, upcast=True).to(dtype)
    x = (torch.randn(2, 5, 16) * 30).to(dtype)
    with torch.no_grad():
        ours = attention(x)
        q, k, v = (proj(x).view(2, 5, 2, 8).transpose(1, 2) for proj in (attention.to_q, attention.to_k, attention.to_v))
        fp32 = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
        expected = attention.to_out[0](fp32.transpose(1, 2).reshape(2, 5, 16))
    assert ours.dtype == dtype and torch.isfinite(ours).all() and torch.equal(ours, expected)
    with torch.no_grad():                                     # fp32 activations: the flag changes nothing
        assert torch.equal(attention.float()(x.float()), Attention.forward(attention, x.float()))


def test_every_unet_tensor_of_the_real_files_maps_onto_our_model():
    with torch.device("meta"):
        unet = UNet2DConditionModel(config=UNetConfig.sd_v2())
    unet_t = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith(single_file.UNET_PREFIX)}
    check_keys(_shapes(unet), {k: tuple(v.shape) for k, v in rename(_fake(unet_t), single_file.unet_table(unet.config)).items()},
               source="single file UNet")
    check_keys(_shapes(unet), {k: tuple(v) for k, v in FOLDER_MANIFEST["unet/diffusion_pytorch_model.safetensors"].items()},
               source="folder UNet")
    assert UNetConfig.from_json(PUBLIC / "unet" / "config.json") == UNetConfig.sd_v2()


def test_the_single_files_configs_are_inferred_as_diffusers_reads_them():
    """v_prediction (the default): SD 2.1's configs, as diffusers' from_single_file fetches them for every
    SD 2.x file; epsilon: 2.1-base's (512x512, no upcast)."""
    shapes = {k: tuple(v) for k, v in SINGLE_MANIFEST.items()}
    public = UNetConfig.from_json(PUBLIC / "unet" / "config.json")
    unet, vae = configs_from_shapes(shapes, source="v2-1_768-ema-pruned.safetensors", prediction_type="v_prediction")
    assert unet == public == UNetConfig.sd_v2() and unet.attention_head_dim == (5, 10, 20, 20)
    assert vae == VAEConfig.sd_v1()
    base, _ = configs_from_shapes(shapes, source="v2-1_512-ema-pruned.safetensors", prediction_type="epsilon")
    assert base == UNetConfig.sd_v2(**SD_V2_BASE) and base.sample_size == 64 and not base.upcast_attention


def test_a_single_files_unet_of_widths_not_in_64_wide_heads_is_refused():
    """SD 2.x's head count is not in the file: read as its 64-wide heads, or refused asking for the config."""
    shapes = {k: v for k, v in SINGLE_MANIFEST.items() if k.startswith(single_file.UNET_PREFIX)}
    shapes[single_file.UNET_PREFIX + "input_blocks.1.0.out_layers.3.weight"] = [352, 352, 3, 3]   # 11 groups of 32
    with pytest.raises(CheckpointError, match=r"v2\.safetensors: UNet widths \(352, 640, 1280, 1280\) do not split "
                                              r"into SD 2\.x's 64-wide attention heads.*pass --config DIR"):
        single_file.infer_unet_config(_fake(shapes), source="v2.safetensors", prediction_type="v_prediction")


def test_a_single_files_prediction_type_follows_the_documented_rule(tmp_path):
    """--prediction_type, else the --config folder's scheduler_config.json, else the family's: v_prediction for
    SD 2.x (OpenCLIP's tower), as diffusers' from_single_file reads every SD 2.x file, epsilon for SD v1; the
    schedule is SD 2.1's published one."""
    from diffusion.checkpoints.load import SCHEDULER_CONFIGS, single_file_prediction_type
    sd1 = json.loads((MANIFESTS / "sd_v1_single_file.json").read_text())["model_tensors"]
    assert single_file_prediction_type(SINGLE_MANIFEST, None, None) == "v_prediction"
    assert single_file_prediction_type(sd1, None, None) == "epsilon"
    assert single_file_prediction_type(SINGLE_MANIFEST, "epsilon", None) == "epsilon"
    configs = tmp_path / "configs"                        # the tiny UNet's configs, with no scheduler/
    shutil.copytree(FOLDER, configs, ignore=shutil.ignore_patterns("scheduler", "*.safetensors"))
    assert single_file_prediction_type(SINGLE_MANIFEST, None, configs) == "v_prediction"
    assert load_stable_diffusion(SINGLE, config_dir=configs).scheduler_config["prediction_type"] == "v_prediction"
    epsilon = load_stable_diffusion(SINGLE, config_dir=configs, prediction_type="epsilon")
    assert epsilon.scheduler_config["prediction_type"] == "epsilon"
    (configs / "scheduler").mkdir()
    (configs / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    assert single_file_prediction_type(SINGLE_MANIFEST, None, configs) == "epsilon"      # the config's, not the family's
    public = json.loads((PUBLIC / "scheduler" / "scheduler_config.json").read_text())
    assert SCHEDULER_CONFIGS["sd2"] == {k: public[k] for k in SCHEDULER_CONFIGS["sd2"]}
    assert set(public) - set(SCHEDULER_CONFIGS["sd2"]) == {"_class_name", "_diffusers_version", "skip_prk_steps",
                                                           "trained_betas"}


# ---- the pipeline: both layouts, v-prediction, sample.py -------------------------------------------
@pytest.fixture(scope="module")
def folder_models():
    return load_stable_diffusion(FOLDER)


@pytest.fixture(scope="module")
def single_models():
    return load_stable_diffusion(SINGLE, config_dir=FOLDER)


def test_both_layouts_load_as_sd2_with_v_prediction(folder_models, single_models):
    for models in (folder_models, single_models):
        assert models.scheduler_config["prediction_type"] == "v_prediction"
        assert models.tokenizer.pad_token_id == 0 and models.text_encoder.config.hidden_act == "gelu"
        assert models.unet.config == UNetConfig.from_json(FOLDER / "unet" / "config.json")


def test_a_single_file_without_config_gets_the_sd2_tokenizer(tmp_path):
    """A single file carries no tokenizer: the shipped vocabulary, padded with "!" for an OpenCLIP tower."""
    # the tiny UNet's shapes cannot give its heads: its configs, without the tokenizer/ beside them
    configs = tmp_path / "configs"
    shutil.copytree(FOLDER, configs, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    models = load_stable_diffusion(SINGLE, config_dir=configs)
    assert models.tokenizer.pad_token == "!" and models.tokenizer.pad_token_id == 0
    assert len(models.tokenizer.vocab) == 49408


# ---- whole images: sample.py against StableDiffusionPipeline -----------------------------------------
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
    return argv


@pytest.mark.parametrize("layout", ["folder", "single_file"])
@pytest.mark.parametrize("run", RUNS, ids=[r["name"] for r in RUNS])
def test_sample_py_equals_diffusers_with_v_prediction(run, layout, tmp_path, capsys):
    assert run["prediction_type"] == "v_prediction"
    written = sample.main(_argv(run, layout, tmp_path))
    n = run["num_images_per_prompt"]
    for i, path in enumerate(written[:n]):
        ours = np.asarray(Image.open(path)).astype(int)
        theirs = np.asarray(Image.open(SD2 / "pipeline" / run["images"][i])).astype(int)
        assert ours.shape == theirs.shape, f"{run['name']} ({layout}): {ours.shape} != {theirs.shape}"
        diff = np.abs(ours - theirs).max()
        assert diff <= MAX_DIFF, f"{run['name']} ({layout}) image {i}: max |diff| {diff}/255"


# ---- bad input: one line, exit 2, before sampling ---------------------------------------------------
def test_a_prediction_type_the_folder_contradicts_is_refused_naming_both(tmp_path, sample_refusal, no_sampling):
    message = sample_refusal(["--ckpt", str(FOLDER), "--prediction_type", "epsilon", "--outdir", str(tmp_path)])
    assert "--prediction_type epsilon" in message and "scheduler_config.json says prediction_type 'v_prediction'" in message
    message = sample_refusal(["--ckpt", str(SINGLE), "--config", str(FOLDER), "--prediction_type", "epsilon",
                              "--outdir", str(tmp_path)])
    assert "--prediction_type epsilon" in message and "'v_prediction'" in message
    assert not (tmp_path / "samples").exists()
    with pytest.raises(ValueError, match="--prediction_type epsilon: .* says prediction_type 'v_prediction'"):
        load_stable_diffusion(FOLDER, prediction_type="epsilon")
    assert load_stable_diffusion(FOLDER, prediction_type="v_prediction").scheduler_config["prediction_type"] == "v_prediction"


def _without_block(tmp_path: Path, block: int) -> Path:
    tensors = {k: v for k, v in read_safetensors(SINGLE).items()
               if not k.startswith(f"{OPENCLIP_PREFIX}transformer.resblocks.{block}.")}
    write_safetensors(tmp_path / "broken.safetensors", tensors)
    return tmp_path / "broken.safetensors"


@pytest.mark.parametrize("block", [0, 1])
def test_a_text_tower_missing_blocks_is_refused_naming_them(block, tmp_path, sample_refusal, no_sampling):
    broken = _without_block(tmp_path, block)
    message = sample_refusal(["--ckpt", str(broken), "--config", str(FOLDER), "--outdir", str(tmp_path / "out")])
    assert "OpenCLIP ViT-H/14 text tower of SD 2.x in this file lacks transformer block(s) " + str(block) in message
    assert not (tmp_path / "out" / "samples").exists()


def test_an_sd2_text_encoder_beside_an_sd_v1_unet_is_refused_naming_the_widths(tmp_path, sample_refusal, no_sampling):
    """A folder whose UNet is SD v1.5's (cross-attention 768) and whose text encoder is SD 2.1's (1024):
    refused from the configs alone, before any weight is read."""
    folder = tmp_path / "mixed"
    shutil.copytree(PUBLIC, folder)
    shutil.copy(FIXTURES / "public_configs" / "runwayml--stable-diffusion-v1-5" / "unet" / "config.json",
                folder / "unet" / "config.json")
    shutil.copy(FOLDER / "model_index.json", folder / "model_index.json")
    message = sample_refusal(["--ckpt", str(folder), "--outdir", str(tmp_path / "out")])
    assert "the text encoder's states are 1024 wide but the UNet's cross-attention reads 768-wide ones" in message
    with pytest.raises(ValueError, match="1024 wide but the UNet's cross-attention reads 768"):
        read_configs(folder, None)


def test_a_single_files_text_tower_of_another_width_is_refused(tmp_path, sample_refusal, no_sampling):
    """The single file's OpenCLIP tower 16 wide beside a UNet reading 32-wide states."""
    torch.manual_seed(0)
    narrow = CLIPTextModel(CLIPTextConfig.open_clip_vit_h14(vocab_size=1014, hidden_size=16, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=2))
    from common.state_dict import rename as rename_keys
    tower = fuse_in_proj(rename_keys(narrow.state_dict(), openclip_table(2), reverse=True))
    tensors = {k: v for k, v in read_safetensors(SINGLE).items() if not k.startswith("cond_stage_model.")} | tower
    write_safetensors(tmp_path / "mixed.safetensors", tensors)
    message = sample_refusal(["--ckpt", str(tmp_path / "mixed.safetensors"), "--config", str(FOLDER), "--outdir",
                              str(tmp_path / "out")])
    assert "the text encoder's states are 16 wide but the UNet's cross-attention reads 32-wide ones" in message


# ---- DreamBooth and LoRA on SD 2.x ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd2_data")
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    for i, (h, w) in enumerate([(20, 24), (16, 16)]):
        pixels = np.clip(rng.integers(0, 255, (1, 1, 3)) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "instance" / f"photo{i}.png")
    return root


def _train_args(data: Path, out: Path, *extra: str, model: Path = FOLDER) -> list[str]:
    config = ["--pretrained_config_dir", str(FOLDER)] if model == SINGLE else []
    return ["--pretrained_model_name_or_path", str(model), *config, "--instance_data_dir", str(data / "instance"),
            "--instance_prompt", "a photo of sks dog", "--resolution", "16", "--train_batch_size", "1",
            "--learning_rate", "1e-3", "--checkpointing_steps", "100", "--device", "cpu", "--output_dir", str(out),
            "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "2",
            "--class_data_dir", str(data / "class"), "--sample_batch_size", "2", *extra]


def test_the_training_target_is_v(folder_models):
    """The loss's target on a v-prediction model: v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022)."""
    from diffusion.schedule import NoiseSchedule, ScheduleConfig
    from dreambooth.steps import Batch, Draws, denoising_prediction
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(folder_models.scheduler_config))
    g = torch.Generator().manual_seed(0)
    batch = Batch(pixels=torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, generators=[], crops=[])
    draws = Draws(posterior=torch.randn(2, 4, 4, 4, generator=g), noise=torch.randn(2, 4, 4, 4, generator=g),
                  timesteps=torch.tensor([10, 900]))
    states = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        pred, target, t = denoising_prediction(folder_models.unet, folder_models.vae, schedule, batch, states,
                                               precision="fp32", offset_noise=False, draws=draws)
        latents = folder_models.vae.encode(batch.pixels).sample(noise=draws.posterior) * 0.18215
    assert torch.allclose(target, schedule.get_velocity(latents, draws.noise, t), atol=1e-6)
    assert not torch.allclose(target, draws.noise, atol=1e-2)


@pytest.mark.parametrize("model", ["folder", "single_file"])
def test_dreambooth_trains_sd2_and_writes_both_layouts(model, data, tmp_path):
    """v target, prior preservation, min-SNR on the v loss, the text encoder trained too; the folder and the
    single file (OpenCLIP names, fused in_proj) load back to the trained weights."""
    import train_dreambooth
    out = tmp_path / "sks"
    argv = _train_args(data, out, "--max_train_steps", "2", "--snr_gamma", "5.0", "--train_text_encoder",
                       "--save_single_file", model=FOLDER if model == "folder" else SINGLE)
    assert train_dreambooth.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["prior_loss"]) for r in records)
    folder = load_stable_diffusion(out)
    assert folder.scheduler_config["prediction_type"] == "v_prediction" and folder.tokenizer.pad_token_id == 0
    written = read_safetensors(out / "sks.safetensors")
    assert f"{OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in written
    assert (f"{OPENCLIP_PREFIX}text_projection" in written) == (model == "single_file")   # kept from the source
    single = load_stable_diffusion(out / "sks.safetensors", config_dir=out)
    for part in ("unet", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), part               # fp16 in the single file
    before = load_stable_diffusion(FOLDER).text_encoder.state_dict()
    assert not torch.equal(before["layers.0.self_attn.q_proj.weight"], folder.text_encoder.state_dict()["layers.0.self_attn.q_proj.weight"])


def test_a_prediction_type_for_the_folder_the_scheduler_contradicts_stops_training(data, tmp_path, capsys):
    import train_dreambooth
    code = train_dreambooth.main(_train_args(data, tmp_path / "out", "--max_train_steps", "1",
                                             "--prediction_type", "epsilon"))
    err = capsys.readouterr().err
    assert code == 2 and "--prediction_type epsilon" in err and "'v_prediction'" in err
    assert not (tmp_path / "out").exists()


def test_diffusers_read_our_sd2_dreambooth_outputs():
    """tools/make_reference_sd2.py ran our train_dreambooth.py on this tiny SD 2 and read its outputs with
    diffusers: the folder, the single file (bit for bit the folder's weights in fp16) and both LoRA files."""
    check = META["dreambooth"]
    assert "bit for bit" in check["full"] and check["full_prediction_type"] == "v_prediction"
    assert "no warning" in check["lora"]
    for counts in check["lora_adapted_modules"].values():
        assert counts == {"unet": 4 * 2 * 4, "text_encoder": 2 * 4}   # 4 transformers x 2 attentions x 4; 2 layers x 4


LORA = SD2 / "kohya_lora.safetensors"


def test_a_kohya_sd2_lora_gives_diffusers_outputs():
    """kohya's names on SD 2's modules (the Linear proj_in/proj_out, lora_te_text_model_encoder_layers_N_...),
    read onto ours as diffusers' loader reads them; unfused, scale 1."""
    from diffusion.checkpoints.lora_files import apply_lora, read_lora
    models = load_stable_diffusion(FOLDER)
    updates, skipped = read_lora(LORA, models)
    assert not skipped and len(updates) == sum(META["lora"]["modules"].values())
    assert any(u.module.endswith("proj_in") for u in updates)
    apply_lora(models, updates)
    with torch.no_grad():
        out = models.unet(REF["lora.unet.sample"], REF["lora.unet.t"], REF["lora.unet.context"])
        states = models.text_encoder(REF["lora.text.ids"]).last_hidden_state
    assert (out - REF["lora.unet.out"]).abs().max() <= 1e-4
    assert (states - REF["lora.text.states"]).abs().max() <= 1e-4


def test_an_sd2_lora_on_an_sd_v1_model_is_refused_naming_a_key_and_both_shapes():
    from diffusion.checkpoints.lora_files import read_lora
    models = load_stable_diffusion(FIXTURES / "sd" / "tiny_diffusers")
    with pytest.raises(CheckpointError, match=r"kohya_lora\.safetensors: lora_[\w.]+ has shape \(\d+, \d+\), but .* needs "
                                              r"\(\d+, \d+\): this LoRA was made for another architecture"):
        read_lora(LORA, models)


@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_sample_py_with_a_kohya_sd2_lora_equals_diffusers_fuse_lora(layout, tmp_path, capsys):
    run = META["lora"]["run"]
    ckpt = ["--ckpt", str(FOLDER)] if layout == "folder" else ["--ckpt", str(SINGLE), "--config", str(FOLDER)]
    written = sample.main([*ckpt, "--outdir", str(tmp_path), "--prompt", run["prompt"], "--n_samples", "1",
                           "--ddim_steps", str(run["num_inference_steps"]), "--scale", str(run["guidance_scale"]),
                           "--H", str(run["height"]), "--W", str(run["width"]), "--seed", str(run["seed"]),
                           "--device", "cpu", "--lora", f"{LORA}:{run['scale']}"])
    ours = np.asarray(Image.open(written[0])).astype(int)
    diff = np.abs(ours - REF["lora.image"][0].numpy().astype(int)).max()
    assert diff <= MAX_DIFF, f"max |diff| {diff}/255"


def test_lora_training_on_sd2_writes_files_that_read_back(data, tmp_path):
    import train_dreambooth
    from diffusion.checkpoints.lora_files import read_lora
    out = tmp_path / "lora"
    assert train_dreambooth.main(_train_args(data, out, "--max_train_steps", "2", "--rank", "4", "--train_text_encoder",
                                             "--lora_format", "kohya", "--snr_gamma", "5.0")) == 0
    models = load_stable_diffusion(FOLDER)
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        updates, skipped = read_lora(out / name, models)
        assert not skipped and len(updates) == 4 * 2 * 4 + 2 * 4


# ---- the porter's kit on every SD 2.x component ------------------------------------------------------
TRACES = SD2 / "traces"
# modules our trace names that the reference cannot hook: transformers 5's renamed wrappers, and
# nn.MultiheadAttention's out_proj, whose weights it uses without calling the module
ONLY_OURS = {"text_encoder": r"text_model(\.embeddings|\.encoder)?",
             "text_encoder_open_clip": r"cond_stage_model\.model\.transformer\.resblocks\.\d+\.attn\.out_proj"}


def _held_to(reference_file: Path, ours: dict, case: str, tmp_path: Path, rtol: float) -> None:
    import re
    from porting.compare import compare, read_trace
    from porting.trace import write_trace
    reference, _ = read_trace(reference_file)
    assert not set(reference) - set(ours), sorted(set(reference) - set(ours))[:5]
    extra = sorted(k for k in set(ours) - set(reference) if not re.fullmatch(ONLY_OURS.get(case, "$^"), k))
    assert not extra, f"names the reference does not have: {extra[:5]}"
    write_trace(tmp_path / "ours.safetensors", {k: ours[k] for k in reference}, {})
    result = compare(reference_file, tmp_path / "ours.safetensors", rtol=rtol)
    assert not result.beyond, f"beyond {rtol:g}: {result.beyond[:5]}"


@pytest.mark.parametrize("case, model, component, config", [
    ("unet", FOLDER, "unet", None),
    ("text_encoder", FOLDER, "text_encoder", None),
    ("text_encoder_open_clip", SINGLE, "text_encoder", FOLDER),       # under OpenCLIP's names, as the file's
])
def test_every_layer_matches_the_reference_library(case, model, component, config, tmp_path):
    from porting.components import load_component
    from porting.trace import trace
    loaded = load_component(model, component, config_dir=config)
    inputs = read_safetensors(TRACES / f"{case.removesuffix('_open_clip')}_inputs.safetensors")
    _held_to(TRACES / f"{case}_reference.safetensors", trace(loaded, inputs), case, tmp_path, 1e-4)
    if case == "text_encoder_open_clip":
        assert loaded.layout == "openclip-text"


@pytest.mark.parametrize("case, model, config", [("unet", FOLDER, None), ("text_encoder_open_clip", SINGLE, FOLDER)])
def test_every_gradient_matches_the_reference_librarys_autograd(case, model, config, tmp_path):
    """`trace --backward` on SD 2's UNet (Linear projections) and OpenCLIP's tower: one gradient for the fused
    in_proj, our q/k/v gradients joined in the file's order."""
    from porting.components import load_component
    from porting.trace import trace
    component = "unet" if case == "unet" else "text_encoder"
    ours = trace(load_component(model, component, config_dir=config),
                 read_safetensors(TRACES / f"{case}_backward_inputs.safetensors"), backward=True)
    grads = {k: v for k, v in ours.items() if k.startswith("grad:") or k == "loss"}
    assert (case == "unet") or f"grad:{OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in grads
    _held_to(TRACES / f"{case}_gradients_reference.safetensors", grads, case, tmp_path, 1e-5)


def test_the_single_file_unet_and_vae_trace_under_ldm_names(tmp_path):
    """The single file's UNet under LDM's names holds the folder's numbers; the VAE (SD v1's architecture, and
    here the tiny SD v1's weights) matches diffusers' VAE traces of tests/fixtures/traces."""
    from porting.components import load_component
    from porting.trace import trace
    inputs = read_safetensors(TRACES / "unet_inputs.safetensors")
    ldm = trace(load_component(SINGLE, "unet", config_dir=FOLDER), inputs)
    ours = trace(load_component(FOLDER, "unet"), inputs)
    p = "model.diffusion_model."
    for theirs, mine in {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
                         "input_blocks.1.1": "down_blocks.0.attentions.0", "middle_block": "mid_block",
                         "output_blocks.3.1.proj_out": "up_blocks.1.attentions.1.proj_out", "out": "conv_out"}.items():
        torch.testing.assert_close(ldm[p + theirs], ours[mine], rtol=0, atol=1e-5, msg=theirs)
    assert ldm[p + "input_blocks.1.1.proj_in"].ndim == 3             # a Linear on the tokens: (B, HW, C)
    v1 = FIXTURES / "traces"
    for component in ("vae_encoder", "vae_decoder"):
        for model, config in ((FOLDER, None), (SINGLE, FOLDER)):
            traced = trace(load_component(model, component, config_dir=config),
                           read_safetensors(v1 / f"{component}_inputs.safetensors"))
            if model == FOLDER:
                _held_to(v1 / f"{component}_reference.safetensors", traced, component, tmp_path, 1e-4)
            else:
                assert traced                                        # LDM's names, as for SD v1
