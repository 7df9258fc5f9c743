"""Dev-only: a tiny random SDXL checkpoint in both public layouts, and what diffusers, transformers and
open_clip make of it.

    .venv-dev/bin/python tools/make_reference_sdxl.py

Run after tools/make_reference_sd.py and tools/make_reference_sd2.py (the tiny SDXL takes the tiny SD's VAE
with SDXL's latent scale, the tiny SD's tokenizer for its first text encoder and the tiny SD 2's, padding with
"!", for its second). Shapes follow diffusers' own StableDiffusionXLPipelineFastTests.get_dummy_components
(tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py: two levels, no attention at the first,
`transformer_layers_per_block` (1, 2), `addition_time_embed_dim` 8, GroupNorm of one group, 5-layer text
towers 37 wide in their MLP), with three changes, each for a reason: the two towers have different widths
(32 and 64: diffusers' from_single_file tells SDXL's towers apart by width, and with equal widths reads the
first into both), the second projects to 48 (so a transposed projection cannot pass), and the UNet is 8/16
wide (its 2/4 gives one-channel heads). Writes under tests/fixtures/sdxl/:

- tiny_diffusers/: `StableDiffusionXLPipeline.save_pretrained` (force_zeros_for_empty_prompt, no watermark),
  the text encoders under transformers 4's `text_model.` names (with position_ids) as the public folder has
  them, and SDXL base's scheduler_config.json (EulerDiscreteScheduler, "leading").
- tiny_single.safetensors: the same weights in sgm's layout of sd_xl_base_1.0.safetensors:
  `model.diffusion_model.*` (`label_emb.0.{0,2}`), `first_stage_model.*`,
  `conditioner.embedders.0.transformer.text_model.*` (ViT-L/14's place) and the whole OpenCLIP model under
  `conditioner.embedders.1.model.*` (fused in_proj, text_projection (D, P), logit_scale). PROVEN by diffusers'
  `from_single_file` reading it to the folder's tensors bit for bit.
- reference.safetensors + reference.json: StableDiffusionXLPipeline.encode_prompt's states and pooled embeds,
  open_clip's own penultimate states and projected pooled output of the single file's tower, diffusers' UNet
  output with the micro-conditioning; pipeline/: images of every sampler's diffusers scheduler, from the folder
  and (within 1/255) from the single file.
- kohya_lora.safetensors and diffusers_lora.safetensors: LoRAs on every attention, projection and feed-forward
  output Linear of the UNet and every attention and MLP Linear of both text encoders, in kohya's SDXL names
  (sd-scripts: lora_unet_ + sgm's block names, lora_te1_, lora_te2_; alpha 2, rank 4) and in diffusers' (peft's,
  with text_encoder_2.); diffusers' load_lora_weights adapts every module of each; its UNet output and prompt
  embeddings with the LoRA, and its image after fuse_lora(lora_scale=0.8).
and under tests/manifests/: sdxl_base_diffusers.json and sdxl_base_single_file.json, the names and shapes of
the real stabilityai/stable-diffusion-xl-base-1.0 files from the reference classes on the meta device
(diffusers' published configs; open_clip's ViT-bigG-14 for the single file's second tower).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import make_reference_sd as sd1  # noqa: E402  (the v1 tool's inverse LDM mapping)

OUT = ROOT / "tests" / "fixtures" / "sdxl"
FOLDER, SINGLE = OUT / "tiny_diffusers", OUT / "tiny_single.safetensors"
SD1_FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
SD2_FOLDER = ROOT / "tests" / "fixtures" / "sd2" / "tiny_diffusers"
MANIFESTS = ROOT / "tests" / "manifests"
CLIP_L, OPENCLIP = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 48,
                 cross_attention_dim=32 + 64, norm_num_groups=1)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2, projection_dim=32)
TINY_TEXT_2 = dict(TINY_TEXT, hidden_size=64, hidden_act="gelu", projection_dim=48)
TINY_OPENCLIP = dict(context_length=77, width=64, heads=4, layers=5, mlp_ratio=37 / 64)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, as published.
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def open_clip_tower(*, vocab_size: int, embed_dim: int, **text):
    """open_clip's CLIP with the given text tower, its image tower deleted, as sgm's FrozenOpenCLIPEmbedder2 keeps it."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    model = CLIP(embed_dim=embed_dim, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                               image_size=16),
                 text_cfg=CLIPTextCfg(vocab_size=vocab_size, **text))
    del model.visual
    return model


def open_clip_sdxl(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sgm's FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False): the
    penultimate block's output (no final LayerNorm), and the last block's, through ln_final, at the end token
    (the largest id), times text_projection."""
    T = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:T]
    blocks = model.transformer.resblocks
    for i, block in enumerate(blocks):
        x = block(x, attn_mask=model.attn_mask[:T, :T])
        if i == len(blocks) - 2:
            penultimate = x
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection
    return penultimate, pooled


def text_encoder_2_from_open_clip(tower, config: dict):
    """transformers' CLIPTextModelWithProjection holding the open_clip tower, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    text = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    converted = convert_open_clip_checkpoint(text, {OPENCLIP + k: v for k, v in tower.state_dict().items()},
                                             prefix=OPENCLIP)
    text.load_state_dict(converted)                 # strict: names any missing or unexpected tensor
    return text


# ---------------------------------------------------------------- the tiny pipeline
def build():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    gen = torch.Generator().manual_seed(30)
    torch.manual_seed(30)
    tokenizer = CLIPTokenizer.from_pretrained(str(SD1_FOLDER / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(SD2_FOLDER / "tokenizer"))
    assert tokenizer_2.pad_token_id == 0 and tokenizer.pad_token_id != 0
    v1, v2 = len(tokenizer.get_vocab()), len(tokenizer_2.get_vocab())

    unet = UNet2DConditionModel(**TINY_UNET).eval()
    sd1.perturb(unet, gen)
    vae_sd1 = AutoencoderKL.from_pretrained(str(SD1_FOLDER / "vae"))
    vae = AutoencoderKL.from_config({**vae_sd1.config, "scaling_factor": 0.13025, "force_upcast": True}).eval()
    vae.load_state_dict(vae_sd1.state_dict())
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, vocab_size=v1)).eval()
    sd1.perturb(text, gen)
    tower = open_clip_tower(vocab_size=v2, embed_dim=TINY_TEXT_2["projection_dim"], **TINY_OPENCLIP).eval()
    sd1.perturb(tower, gen)
    text_2 = text_encoder_2_from_open_clip(tower, {**TINY_TEXT_2, "vocab_size": v2})
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in SDXL_SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    public_layout()

    cross = [t.startswith("CrossAttn") for t in TINY_UNET["down_block_types"]]
    unet_sd = unet.state_dict()
    single = sd1.unet_to_ldm({k: v for k, v in unet_sd.items() if not k.startswith("add_embedding.")}, 2, 2, cross)
    single |= {f"model.diffusion_model.label_emb.0.{0 if '_1.' in k else 2}.{k.rsplit('.', 1)[1]}": v
               for k, v in unet_sd.items() if k.startswith("add_embedding.")}
    single |= sd1.vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    single |= {CLIP_L + k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    single[CLIP_L + "embeddings.position_ids"] = torch.arange(77)[None]
    single |= {OPENCLIP + k: v for k, v in tower.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sorted(single.items())}, str(SINGLE))
    return pipe, tower


def public_layout() -> None:
    """Both text encoders under transformers 4's `text_model.` names with position_ids (as the public folder's
    model.safetensors files), SDXL base's scheduler config as published, the tokenizers' files as their sources."""
    for part in ("text_encoder", "text_encoder_2"):
        path = FOLDER / part / "model.safetensors"
        tensors = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                   for k, v in load_file(str(path)).items()}
        tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file(tensors, str(path), metadata={"format": "pt"})
    for part, source in (("tokenizer", SD1_FOLDER), ("tokenizer_2", SD2_FOLDER)):
        shutil.rmtree(FOLDER / part)
        shutil.copytree(source / "tokenizer", FOLDER / part)
    (FOLDER / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=2) + "\n")


def load_both():
    from diffusers import StableDiffusionXLPipeline
    folder = StableDiffusionXLPipeline.from_pretrained(str(FOLDER), add_watermarker=False)
    single = StableDiffusionXLPipeline.from_single_file(str(SINGLE), config=str(FOLDER), add_watermarker=False)
    return folder, single


def prove(pipe, folder, single) -> None:
    """The folder reloads to the same tensors; from_single_file reads the single file to them, bit for bit."""
    for name, loaded in (("from_pretrained", folder), ("from_single_file", single)):
        assert loaded.config.force_zeros_for_empty_prompt and loaded.tokenizer_2.pad_token_id == 0
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            want, got = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
            assert set(want) == set(got), (name, part, sorted(set(want) ^ set(got))[:5])
            bad = [k for k in want if not torch.equal(want[k], got[k])]
            assert not bad, (name, part, bad[:5])
        print(f"{name}: unet, vae, text_encoder, text_encoder_2 bit-identical to the built pipeline")


# ---------------------------------------------------------------- references
def reference(pipe, tower) -> tuple[dict, dict]:
    tensors = {}
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        prompts = ["a photo of a cat!", "a castle on a hill, oil painting " * 12]
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                       do_classifier_free_guidance=True)
        tensors |= {"text.states": embeds, "text.pooled": pooled, "text.negative_states": negative,
                    "text.negative_pooled": negative_pooled}
        ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        tensors["text.ids_2"] = ids
        tensors["text.open_clip_penultimate"], tensors["text.open_clip_pooled"] = open_clip_sdxl(tower, ids)
        gap = max((tensors["text.open_clip_penultimate"] - embeds[..., 32:]).abs().max().item(),
                  (tensors["text.open_clip_pooled"] - pooled).abs().max().item())
        assert gap < 1e-5, gap
        tensors["unet.sample"] = torch.randn(2, 4, 8, 12, generator=g)
        tensors["unet.t"] = torch.tensor([999.0, 21.0])
        tensors["unet.context"] = torch.randn(2, 77, 96, generator=g)
        tensors["unet.text_embeds"] = torch.randn(2, 48, generator=g)
        tensors["unet.time_ids"] = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 64.0, 96.0], [512.0, 512.0, 16.0, 8.0, 32.0, 48.0]])
        tensors["unet.out"] = pipe.unet(tensors["unet.sample"], tensors["unet.t"], tensors["unet.context"],
                                        added_cond_kwargs={"text_embeds": tensors["unet.text_embeds"],
                                                           "time_ids": tensors["unet.time_ids"]}).sample
    meta = {"text": {"prompts": prompts, "open_clip_vs_transformers_max_abs": gap}}
    return tensors, meta


SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
              "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
              "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
              "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {})}
# (name, sampler, prompt, negative, images per prompt, steps, guidance, height, width, seed, micro-conditioning)
PIPELINE_RUNS = [
    ("euler_cat_2x32x32", "euler", "a photo of a cat", None, 2, 4, 5.0, 32, 32, 0, {}),
    ("ddim_negative_boat_32x48", "ddim", "a boat at sea", "storm", 1, 4, 7.5, 32, 48, 1, {}),
    ("dpmpp_2m_micro_conditioned_house", "dpmpp_2m", "a house", None, 1, 4, 5.0, 32, 32, 2,
     {"original_size": [512, 384], "crops_coords_top_left": [16, 8], "target_size": [1024, 1024]}),
    ("dpmpp_2m_karras_empty_negative_tree", "dpmpp_2m_karras", "a tree", "", 1, 4, 5.0, 32, 32, 3, {}),
    ("plms_default_size_lighthouse", "plms", "a lighthouse", None, 1, 3, 5.0, None, None, 4, {}),
    ("euler_a_no_guidance_dog", "euler_a", "a dog", None, 2, 3, 1.0, 32, 32, 5, {}),
]


def run_pipeline(pipe, run):
    import diffusers
    name, sampler, prompt, negative, n, steps, scale, height, width, seed, micro = run
    cls, extra = SCHEDULERS[sampler]
    config = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, cls).from_config({**config, **extra})
    pipe.set_progress_bar_config(disable=True)
    micro = {k: tuple(v) for k, v in micro.items()}
    return pipe(prompt, negative_prompt=negative, num_images_per_prompt=n, num_inference_steps=steps,
                guidance_scale=scale, height=height, width=width, generator=torch.Generator().manual_seed(seed),
                **micro).images


def pipeline_images(folder, single) -> list[dict]:
    out = OUT / "pipeline"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs = []
    for run in PIPELINE_RUNS:
        images = run_pipeline(folder, run)
        again = run_pipeline(single, run)
        # the same tensors, but the single file's pooled embedding comes 3.6e-7 apart (its projection is read
        # through a transposed copy): a pixel may round the other way
        apart = max(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() for a, b in zip(images, again))
        assert apart <= 1, (run[0], apart)
        files = []
        for i, image in enumerate(images):
            files.append(f"{run[0]}_{i}.png")
            image.save(out / files[-1])
        name, sampler, prompt, negative, n, steps, scale, height, width, seed, micro = run
        runs.append(dict(name=name, sampler=sampler, scheduler=type(folder.scheduler).__name__, prompt=prompt,
                         negative_prompt=negative, num_images_per_prompt=n, steps=steps, guidance_scale=scale,
                         height=height, width=width, seed=seed, micro_conditioning=micro, size=list(images[0].size),
                         images=files, single_file_max_abs_255=int(apart)))
        print(f"{name}: {len(images)} images {images[0].size}, from the single file within {apart}/255")
    return runs


# ---------------------------------------------------------------- LoRA files for SDXL
LORA_RUN = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=5.0, height=32, width=32, seed=7,
                scale=0.8, sampler="euler")


def lora_files(cross: list[bool]) -> tuple[dict, dict]:
    """kohya's SDXL names (sd-scripts: lora_unet_ + sgm's module names, lora_te1_/lora_te2_ + transformers'), one
    alpha != rank; and diffusers' (peft's lora_A/lora_B under unet./text_encoder./text_encoder_2.), alpha = rank.
    diffusers' load_lora_weights reads each: its UNet output and prompt embeddings unfused, its image fused."""
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(FOLDER), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    unet_names = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"))]
    sgm = {k.removeprefix("model.diffusion_model.").removesuffix(".weight"): v for k, v in
           sd1.unet_to_ldm({f"{n}.weight": n for n in unet_names}, 2, 2, cross).items()}
    sgm = {v: k for k, v in sgm.items()}                                    # diffusers name -> sgm name
    text_names = {part: [n for n, m in getattr(pipe, part).named_modules() if isinstance(m, torch.nn.Linear)
                         and n.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))]
                  for part in ("text_encoder", "text_encoder_2")}
    gen = torch.Generator().manual_seed(32)
    files, ref, meta = {"kohya": {}, "diffusers": {}}, {}, {}
    parts = (("unet", pipe.unet, unet_names), ("text_encoder", pipe.text_encoder, text_names["text_encoder"]),
             ("text_encoder_2", pipe.text_encoder_2, text_names["text_encoder_2"]))
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for part, model, names in parts:
        for n in names:
            w = model.get_submodule(n).weight
            public = n if part == "unet" or n.startswith("text_model.") else "text_model." + n
            for fmt in ("kohya", "diffusers"):
                down = 0.3 * torch.randn(4, w.shape[1], generator=gen)
                up = 0.3 * torch.randn(w.shape[0], 4, generator=gen)
                if fmt == "kohya":
                    flat = kohya_prefix[part] + (sgm[n] if part == "unet" else public).replace(".", "_")
                    files[fmt] |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                                   f"{flat}.alpha": torch.tensor(2.0)}
                else:
                    files[fmt] |= {f"{part}.{public}.lora_A.weight": down, f"{part}.{public}.lora_B.weight": up}
    meta["modules"] = {part: len(names) for part, _, names in parts}
    meta["run"] = LORA_RUN
    g = torch.Generator().manual_seed(33)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 96, generator=g)
    added = {"text_embeds": torch.randn(1, 48, generator=g), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 32.0, 32.0]])}
    ref |= {"lora.unet.sample": sample, "lora.unet.context": context, "lora.unet.text_embeds": added["text_embeds"],
            "lora.unet.time_ids": added["time_ids"]}
    for fmt, tensors in files.items():
        name = f"{fmt}_lora.safetensors"
        save_file(tensors, str(OUT / name), metadata={"format": "pt"})
        pipe = StableDiffusionXLPipeline.from_pretrained(str(FOLDER), add_watermarker=False)   # fresh weights for each
        pipe.load_lora_weights(str(OUT), weight_name=name, adapter_name=fmt)
        adapted = {part: sum(1 for n, _ in getattr(pipe, part).named_modules() if n.endswith(".lora_A"))
                   for part in ("unet", "text_encoder", "text_encoder_2")}
        assert adapted == meta["modules"], (fmt, adapted, meta["modules"])   # every module read, none left out
        with torch.no_grad():
            ref[f"lora.{fmt}.unet.out"] = pipe.unet(sample, torch.tensor([500.0]), context, added_cond_kwargs=added).sample
            states, _, pooled, _ = pipe.encode_prompt(["a dog"], device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            ref[f"lora.{fmt}.text.states"], ref[f"lora.{fmt}.text.pooled"] = states, pooled
        pipe.fuse_lora(lora_scale=LORA_RUN["scale"])
        image = run_pipeline(pipe, (fmt, LORA_RUN["sampler"], LORA_RUN["prompt"], None, 1, LORA_RUN["num_inference_steps"],
                                    LORA_RUN["guidance_scale"], LORA_RUN["height"], LORA_RUN["width"], LORA_RUN["seed"], {}))[0]
        ref[f"lora.{fmt}.image"] = torch.from_numpy(np.asarray(image).copy())
        print(f"{name}: {adapted} modules adapted by diffusers' load_lora_weights")
    return ref, meta


# ---------------------------------------------------------------- manifests of the real SDXL base
def manifests() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    sdxl_unet = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                     "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                     transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet)
        vae = AutoencoderKL(**sd1.SD_V1_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            max_position_embeddings=77, hidden_act="gelu",
                                                            projection_dim=1280))
        tower = open_clip_tower(vocab_size=49408, embed_dim=1280, context_length=77, width=1280, heads=20, layers=32)
    shapes = lambda sd: {k: list(v.shape) for k, v in sd.items()}  # noqa: E731
    texts = {}
    for name, model in (("text_encoder", text), ("text_encoder_2", text_2)):
        keys = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                for k, v in shapes(model.state_dict()).items()}
        keys["text_model.embeddings.position_ids"] = [1, 77]
        texts[f"{name}/model.safetensors"] = keys
    folder = {"unet/diffusion_pytorch_model.safetensors": shapes(unet.state_dict()),
              "vae/diffusion_pytorch_model.safetensors": shapes(vae.state_dict()), **texts}
    unet_sd = {k: v for k, v in unet.state_dict().items()}
    cross = [t.startswith("CrossAttn") for t in sdxl_unet["down_block_types"]]
    single = shapes(sd1.unet_to_ldm({k: v for k, v in unet_sd.items() if not k.startswith("add_embedding.")}, 3, 2, cross))
    single |= {f"model.diffusion_model.label_emb.0.{0 if '_1.' in k else 2}.{k.rsplit('.', 1)[1]}": list(v.shape)
               for k, v in unet_sd.items() if k.startswith("add_embedding.")}
    single |= shapes(sd1.vae_to_ldm(vae.state_dict(), 4))
    single |= {CLIP_L + k.removeprefix("text_model."): list(v.shape) for k, v in text.state_dict().items()}
    single[CLIP_L + "embeddings.position_ids"] = [1, 77]
    single |= {OPENCLIP + k: list(v.shape) for k, v in tower.state_dict().items()}
    count = lambda p: sum(k.startswith(p) for k in single)  # noqa: E731
    (MANIFESTS / "sdxl_base_diffusers.json").write_text(json.dumps(
        {"source": "stabilityai/stable-diffusion-xl-base-1.0 diffusers folder, from diffusers/transformers classes on "
                   "the meta device with its published configs (the text encoders under transformers 4's text_model. "
                   "names, with position_ids)", "files": folder}, indent=0, sort_keys=True))
    (MANIFESTS / "sdxl_base_single_file.json").write_text(json.dumps(
        {"source": f"sd_xl_base_1.0.safetensors layout: {count('model.')} UNet + {count('first_stage_model.')} VAE + "
                   f"{count(CLIP_L)} CLIP ViT-L/14 + {count(OPENCLIP)} OpenCLIP ViT-bigG/14 tensors (open_clip 3.3 "
                   "ViT-bigG-14 without its image tower, as sgm's FrozenOpenCLIPEmbedder2 keeps it)",
         "model_tensors": single}, indent=0, sort_keys=True))
    print(f"manifests: folder {[len(v) for v in folder.values()]}, single file {len(single)}")


def main() -> None:
    pipe, tower = build()
    folder, single = load_both()
    prove(pipe, folder, single)
    tensors, meta = reference(folder, tower)
    meta["pipeline"] = pipeline_images(folder, single)
    lora_tensors, meta["lora"] = lora_files([t.startswith("CrossAttn") for t in TINY_UNET["down_block_types"]])
    tensors |= lora_tensors
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(OUT / "reference.safetensors"),
              metadata={"made_by": "tools/make_reference_sdxl.py"})
    meta["sha256"] = {str(p.relative_to(OUT)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted([*FOLDER.rglob("*"), SINGLE]) if p.is_file()}
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    manifests()
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"tests/fixtures/sdxl: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
