"""Dev-only: a tiny random Stable Diffusion 2.x checkpoint in both public layouts, and what diffusers,
transformers and open_clip make of it.

    .venv-dev/bin/python tools/make_reference_sd2.py

Run after tools/make_reference_sd.py (the tiny SD 2 takes that tiny model's VAE, whose traces
tests/fixtures/traces already hold, and its truncated CLIP vocabulary). Writes under tests/fixtures/sd2/:

- tiny_diffusers/: a `StableDiffusionPipeline.save_pretrained` folder shaped as stabilityai/stable-diffusion-2-1
  is: a UNet with `use_linear_projection`, one `attention_head_dim` per level and `upcast_attention`, a
  transformers CLIPTextModel with `hidden_act: gelu` whose depth is the OpenCLIP tower's minus one (the
  penultimate block), the tokenizer padding with "!" (SD 2.1's special_tokens_map.json), and SD 2.1's
  scheduler_config.json (DDIMScheduler, v_prediction). The text encoder's weights are an open_clip model's,
  converted by diffusers' own `convert_open_clip_checkpoint`.
- tiny_single.safetensors: the same weights in the original LDM layout of an SD 2.x file: `model.diffusion_model.*`
  (proj_in/proj_out as Linear weights), `first_stage_model.*`, and the whole OpenCLIP model under
  `cond_stage_model.model.*` (fused `attn.in_proj_weight`, the last block SD 2 does not run, `text_projection`,
  `logit_scale`), as LDM's FrozenOpenCLIPEmbedder saves it. PROVEN by diffusers' `from_single_file` reading it to
  the folder's tensors bit for bit.
- reference.safetensors + reference.json: transformers' text states from the folder and open_clip's penultimate
  states (SD 2's FrozenOpenCLIPEmbedder.encode_with_transformer) from the single file's tower; diffusers' UNet
  output; transformers' SD 2 tokenizer ids (the full vocabulary, SD 2.1's tokenizer configs) on prompts with
  special-token text; a kohya LoRA's outputs and images (below); the DreamBooth check (below).
- pipeline/: StableDiffusionPipeline images from the folder with DDIM and DPM++ 2M on v-prediction (and at the
  config's default size), the same images from `from_single_file` (the tool checks they are identical).
- kohya_lora.safetensors: a kohya-format LoRA for the tiny SD 2 (attention, the Linear proj_in, text-encoder
  attention and MLP, alpha != rank); diffusers' UNet/text outputs with it unfused and its image after
  load_lora_weights + fuse_lora.
- traces/: layer-by-layer traces (tools/make_reference_traces.py's hooks) of diffusers' SD 2 UNet, transformers'
  gelu CLIPTextModel (the folder), and open_clip's tower run as SD 2 runs it (the single file's names); and the
  UNet's and open_clip's gradients of DreamBooth's loss by their own autograd (for `trace --backward`).
- the DreamBooth check (reference.json "dreambooth"): OUR train_dreambooth.py trained on the tiny SD 2 folder
  (v-prediction, prior preservation, --snr_gamma, --train_text_encoder, --save_single_file) and as a LoRA
  (--rank, kohya too); diffusers read the folder, the single file (from_single_file, bit for bit the folder)
  and both LoRA files with no missing or unexpected key.
and under tests/manifests/: sd_v2_diffusers.json and sd_v2_single_file.json, the names and shapes of the
real stabilityai/stable-diffusion-2-1 files from the reference classes on the meta device (open_clip's
ViT-H-14 for the single file's text tower).
"""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import make_reference_sd as sd1  # noqa: E402  (the v1 tool's inverse LDM mapping and tokenizer writer)
from porting.trace import write_trace  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "sd2"
FOLDER, SINGLE = OUT / "tiny_diffusers", OUT / "tiny_single.safetensors"
SD1_FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
MANIFESTS = ROOT / "tests" / "manifests"
OPENCLIP = "cond_stage_model.model."

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True, upcast_attention=True)
# open_clip's text tower: 3 blocks, SD 2 runs 2 (penultimate); mlp_ratio 4 as ViT-H/14's.
TINY_OPENCLIP = dict(context_length=77, width=32, heads=4, layers=3, mlp_ratio=4.0)
# SD 2.1's text_encoder/config.json fields, at the tiny sizes.
TINY_TEXT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                 eos_token_id=2, projection_dim=512)
# stabilityai/stable-diffusion-2-1's scheduler/scheduler_config.json, as published (no timestep_spacing).
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
_ADDED = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
_MAPPED = {k: v for k, v in _ADDED.items() if k != "__type"}
# stabilityai/stable-diffusion-2-1's tokenizer/: its tokenizer_config.json says <|endoftext|> pads, its
# special_tokens_map.json (which wins) says "!".
SD2_TOKENIZER_CONFIG = {"add_prefix_space": False, "bos_token": {**_ADDED, "content": "<|startoftext|>"},
                        "do_lower_case": True, "eos_token": {**_ADDED, "content": "<|endoftext|>"}, "errors": "replace",
                        "model_max_length": 77, "name_or_path": "stabilityai/stable-diffusion-2", "pad_token": "<|endoftext|>",
                        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
                        "unk_token": {**_ADDED, "content": "<|endoftext|>"}}
SD2_SPECIAL_TOKENS_MAP = {"bos_token": {**_MAPPED, "content": "<|startoftext|>"},
                          "eos_token": {**_MAPPED, "content": "<|endoftext|>"}, "pad_token": "!",
                          "unk_token": {**_MAPPED, "content": "<|endoftext|>"}}
PROMPTS = ["a photo of a cat!", "a dog! in the snow!!", "<|endoftext|> a tree", "<|ENDOFTEXT|> and <|startoftext|>",
           "hello!world", "!", "", "a castle on a hill, oil painting " * 12]


def bpe_file() -> Path:
    import open_clip.tokenizer
    return Path(open_clip.tokenizer.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")


def write_sd2_tokenizer(folder: Path, *, full: bool) -> None:
    """vocab.json + merges.txt built the way OpenAI's code builds them (open_clip's byte table: printable bytes
    first, so "!" is id 0): the real vocabulary, or its first 500 merges for the tiny model; SD 2.1's configs."""
    import open_clip.tokenizer as oct
    merges = gzip.open(bpe_file()).read().decode("utf-8").split("\n")[1:1 + (49152 - 256 - 2 if full else 500)]
    chars = list(oct.bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(SD2_TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SD2_SPECIAL_TOKENS_MAP, indent=2) + "\n")


# ---------------------------------------------------------------- open_clip: SD 2's text tower
def open_clip_model(*, vocab_size: int, **text):
    """open_clip's CLIP with the given text tower, its image tower deleted, as LDM's FrozenOpenCLIPEmbedder keeps it."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    model = CLIP(embed_dim=text["width"] // 2 if text["width"] < 1024 else 1024,
                 vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                 text_cfg=CLIPTextCfg(vocab_size=vocab_size, **text))
    del model.visual
    return model


def penultimate(model, ids: torch.Tensor) -> torch.Tensor:
    """SD 2's conditioning: FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer, its
    text_transformer_forward stopping one block before the end (open_clip 3 runs the blocks batch-first).
    SD 2 always passes 77 tokens; fewer (the traces' 12) take the first positions and the mask's corner."""
    T = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:T]
    blocks = model.transformer.resblocks
    for i, block in enumerate(blocks):
        if i == len(blocks) - 1:
            break
        x = block(x, attn_mask=model.attn_mask[:T, :T])
    return model.ln_final(x)


def text_encoder_from_open_clip(model, config: dict):
    """transformers' CLIPTextModel holding the open_clip tower's first blocks, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    text = CLIPTextModel(CLIPTextConfig(**config)).eval()
    checkpoint = {OPENCLIP + k: v for k, v in model.state_dict().items()}
    converted = convert_open_clip_checkpoint(text, checkpoint)
    own = text.state_dict()
    converted = {(k if k in own else k.removeprefix("text_model.")): v for k, v in converted.items()}
    last = f"encoder.layers.{config['num_hidden_layers']}."   # the block SD 2 does not run, and the projection
    unused = [k for k in converted if k.startswith(last) or k.startswith("text_projection")]
    text.load_state_dict({k: v for k, v in converted.items() if k not in unused})   # strict: names the rest
    return text


# ---------------------------------------------------------------- the tiny pipeline
def build():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    gen = torch.Generator().manual_seed(20)
    torch.manual_seed(20)
    tok_dir = OUT / "_tokenizer_tmp"
    write_sd2_tokenizer(tok_dir, full=False)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0, tokenizer.pad_token
    vocab_size = len(tokenizer.get_vocab())

    unet = UNet2DConditionModel(**TINY_UNET).eval()
    sd1.perturb(unet, gen)
    vae = AutoencoderKL.from_pretrained(str(SD1_FOLDER / "vae")).eval()      # the tiny SD's, traced already
    tower = open_clip_model(vocab_size=vocab_size, **TINY_OPENCLIP).eval()
    sd1.perturb(tower, gen)
    text = text_encoder_from_open_clip(tower, {**TINY_TEXT, "vocab_size": vocab_size})
    scheduler = DDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    public_layout(tok_dir)
    shutil.rmtree(tok_dir)

    single = sd1.to_single_file(unet, vae, text)
    single = {k: v for k, v in single.items() if not k.startswith("cond_stage_model.")}
    single |= {OPENCLIP + k: v for k, v in tower.state_dict().items()}
    save_file({k: v.contiguous() for k, v in single.items()}, str(SINGLE))
    return pipe, tower


def public_layout(tok_dir: Path) -> None:
    """As stabilityai/stable-diffusion-2-1 publishes it (transformers 4.25, diffusers 0.8-0.10): the text encoder
    under `text_model.` with its position_ids, vocab.json + merges.txt with the two configs, and the scheduler
    config as written above."""
    path = FOLDER / "text_encoder" / "model.safetensors"
    tensors = {"text_model." + k: v for k, v in load_file(str(path)).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(TINY_TEXT["max_position_embeddings"])[None]
    save_file(tensors, str(path), metadata={"format": "pt"})
    shutil.rmtree(FOLDER / "tokenizer")
    shutil.copytree(tok_dir, FOLDER / "tokenizer")
    (FOLDER / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_SCHEDULER, indent=2) + "\n")


def prove(pipe) -> None:
    """The folder reloads to the same tensors; from_single_file reads the single file to them, bit for bit."""
    from diffusers import StableDiffusionPipeline
    for name, loaded in (("from_pretrained", StableDiffusionPipeline.from_pretrained(str(FOLDER))),
                         ("from_single_file", StableDiffusionPipeline.from_single_file(
                             str(SINGLE), config=str(FOLDER), safety_checker=None, requires_safety_checker=False))):
        assert loaded.scheduler.config.prediction_type == "v_prediction" and loaded.tokenizer.pad_token_id == 0
        for part in ("unet", "vae", "text_encoder"):
            want, got = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
            assert set(want) == set(got), (name, part, sorted(set(want) ^ set(got))[:5])
            bad = [k for k in want if not torch.equal(want[k], got[k])]
            assert not bad, (name, part, bad[:5])
        print(f"{name}: unet, vae, text_encoder bit-identical to the folder")


# ---------------------------------------------------------------- references
def reference(pipe, tower) -> tuple[dict, dict]:
    from transformers import CLIPTokenizer
    tensors, meta = {}, {}
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        ids = pipe.tokenizer(["a photo of a cat!", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        tensors["text.ids"] = ids
        tensors["text.transformers"] = pipe.text_encoder(ids).last_hidden_state
        tensors["text.open_clip"] = penultimate(tower, ids)
        gap = (tensors["text.transformers"] - tensors["text.open_clip"]).abs().max().item()
        assert gap < 1e-5, gap
        meta["text"] = {"transformers_vs_open_clip_max_abs": gap}
        sample = torch.randn(2, 4, 8, 12, generator=g)
        tensors["unet.sample"], tensors["unet.t"] = sample, torch.tensor([999.0, 21.0])
        tensors["unet.context"] = torch.randn(2, 77, 32, generator=g)
        tensors["unet.out"] = pipe.unet(sample, tensors["unet.t"], tensors["unet.context"]).sample
    full = OUT / "_full_tokenizer_tmp"
    write_sd2_tokenizer(full, full=True)
    tok = CLIPTokenizer.from_pretrained(str(full))
    shutil.rmtree(full)
    meta["tokenizer"] = {"prompts": PROMPTS, "pad_token_id": tok.pad_token_id,
                         "input_ids": tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids,
                         "reference": f"transformers {__import__('transformers').__version__} CLIPTokenizer, the real "
                                      "vocabulary with stabilityai/stable-diffusion-2-1's tokenizer_config.json and "
                                      "special_tokens_map.json"}
    return tensors, meta


PIPELINE_RUNS = [  # (name, prompt, negative, images per prompt, steps, guidance, height, width, seed, scheduler)
    ("ddim_vpred_cat_2x32x32", "a photo of a cat", None, 2, 4, 7.5, 32, 32, 0, "ddim"),
    ("dpmpp_2m_vpred_negative_boat_2x32x48", "a boat at sea", "storm", 2, 5, 7.5, 32, 48, 1, "dpmpp_2m"),
    ("ddim_vpred_default_size_lighthouse", "a lighthouse", None, 1, 3, 5.0, None, None, 2, "ddim"),
]


def run_pipeline(pipe, run):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    name, prompt, negative, n, steps, scale, height, width, seed, scheduler = run
    config = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = (DDIMScheduler if scheduler == "ddim" else DPMSolverMultistepScheduler).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, negative_prompt=negative, num_images_per_prompt=n, num_inference_steps=steps,
                guidance_scale=scale, height=height, width=width, generator=torch.Generator().manual_seed(seed)).images


def pipeline_images() -> list[dict]:
    from diffusers import StableDiffusionPipeline
    folder = StableDiffusionPipeline.from_pretrained(str(FOLDER))
    single = StableDiffusionPipeline.from_single_file(str(SINGLE), config=str(FOLDER), safety_checker=None,
                                                      requires_safety_checker=False)
    out = OUT / "pipeline"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs = []
    for run in PIPELINE_RUNS:
        images = run_pipeline(folder, run)
        again = run_pipeline(single, run)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again)), run[0]
        files = []
        for i, image in enumerate(images):
            files.append(f"{run[0]}_{i}.png")
            image.save(out / files[-1])
        name, prompt, negative, n, steps, scale, height, width, seed, scheduler = run
        runs.append(dict(name=name, prompt=prompt, negative_prompt=negative, num_images_per_prompt=n, steps=steps,
                         guidance_scale=scale, height=height, width=width, seed=seed, sampler=scheduler,
                         scheduler=type(folder.scheduler).__name__, size=list(images[0].size), images=files,
                         prediction_type=folder.scheduler.config.prediction_type))
        print(f"{name}: {len(images)} images {images[0].size}, the same from the single file")
    return runs


# ---------------------------------------------------------------- a kohya LoRA for SD 2
LORA_RUN = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=7.5, height=32, width=32, seed=3, scale=0.8)


def kohya_lora() -> tuple[dict, dict]:
    """kohya's flat names on SD 2's modules: the UNet's attention and its Linear proj_in, the text encoder's
    attention and MLP (`lora_te_text_model_encoder_layers_N_...`: the diffusers-layout text encoder, which
    kohya's sd-scripts train SD 2 on); one alpha for all, != rank."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(22)
    tensors = {}
    unet_names = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"))]
    text_names = [n for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))]
    for prefix, model, names in (("lora_unet_", pipe.unet, unet_names), ("lora_te_", pipe.text_encoder, text_names)):
        for n in names:
            w = model.get_submodule(n).weight
            public = n if prefix == "lora_unet_" or n.startswith("text_model.") else "text_model." + n
            flat = prefix + public.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = 0.3 * torch.randn(4, w.shape[1], generator=gen)
            tensors[f"{flat}.lora_up.weight"] = 0.3 * torch.randn(w.shape[0], 4, generator=gen)
            tensors[f"{flat}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(OUT / "kohya_lora.safetensors"), metadata={"format": "pt"})
    ref = {}
    g = torch.Generator().manual_seed(23)
    pipe.load_lora_weights(str(OUT), weight_name="kohya_lora.safetensors")
    with torch.no_grad():
        ref["lora.unet.sample"] = torch.randn(1, 4, 8, 8, generator=g)
        ref["lora.unet.t"] = torch.tensor([500.0])
        ref["lora.unet.context"] = torch.randn(1, 77, 32, generator=g)
        ref["lora.unet.out"] = pipe.unet(ref["lora.unet.sample"], ref["lora.unet.t"], ref["lora.unet.context"]).sample
        ref["lora.text.ids"] = pipe.tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ref["lora.text.states"] = pipe.text_encoder(ref["lora.text.ids"]).last_hidden_state
    pipe.fuse_lora(lora_scale=LORA_RUN["scale"])
    pipe.scheduler = __import__("diffusers").DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(LORA_RUN["prompt"], num_inference_steps=LORA_RUN["num_inference_steps"],
                 guidance_scale=LORA_RUN["guidance_scale"], height=LORA_RUN["height"], width=LORA_RUN["width"],
                 generator=torch.Generator().manual_seed(LORA_RUN["seed"]), output_type="np").images
    ref["lora.image"] = torch.from_numpy((image * 255).round().astype(np.uint8))
    meta = {"run": LORA_RUN, "modules": {"unet": len(unet_names), "text_encoder": len(text_names)}}
    return ref, meta


# ---------------------------------------------------------------- traces
def traces() -> None:
    """diffusers' UNet, transformers' CLIPTextModel (the folder) and open_clip's tower (the single file's
    names, run as SD 2 runs it), on fixed inputs, by tools/make_reference_traces.py's hooks."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    import make_reference_traces as mrt
    out = OUT / "traces"
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(24)

    def write(name, outputs, inputs):
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(out / f"{name}_inputs.safetensors"))
        write_trace(out / f"{name}_reference.safetensors", outputs,
                    {"made_by": "tools/make_reference_sd2.py", "model": "tests/fixtures/sd2"})
        print(f"trace {name}: {len(outputs)} modules")

    unet = UNet2DConditionModel.from_pretrained(str(FOLDER / "unet")).eval()
    x = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([411.0]),
         "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    write("unet", mrt.trace(unet, lambda: unet(x["sample"], x["timestep"], x["encoder_hidden_states"]), {"": ""}), x)

    text = CLIPTextModel.from_pretrained(str(FOLDER / "text_encoder"), attn_implementation="eager").eval()
    ids = torch.randint(0, 1012, (2, 12), generator=g)
    ids[0, -1], ids[1, 7] = 1013, 1013
    x = {"input_ids": ids}
    write("text_encoder", mrt.trace(text, lambda: text(**x), {"": ""}, FOLDER / "text_encoder" / "model.safetensors"), x)

    tower = open_clip_model(vocab_size=1014, **TINY_OPENCLIP).eval()
    state = {k.removeprefix(OPENCLIP): v for k, v in load_file(str(SINGLE)).items() if k.startswith(OPENCLIP)}
    tower.load_state_dict(state, strict=True)
    outputs = mrt.trace(tower, lambda: penultimate(tower, ids), {"": ""})
    write("text_encoder_open_clip", {OPENCLIP + k: v for k, v in outputs.items()}, x)

    # --backward: DreamBooth's loss on the output and each parameter's gradient by the library's own autograd,
    # under the file's keys (diffusers' names; the single file's for open_clip, whose fused in_proj gets one)
    def gradients(name, model, run, inputs, prefix=""):
        target = torch.randn(run().shape, generator=g)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(run().float(), target.float())
            loss.backward()
        grads = {f"grad:{prefix}{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        save_file({k: v.contiguous() for k, v in {**inputs, "target": target}.items()},
                  str(out / f"{name}_backward_inputs.safetensors"))
        write_trace(out / f"{name}_gradients_reference.safetensors", {"loss": loss.detach(), **grads},
                    {"made_by": "tools/make_reference_sd2.py", "loss": "F.mse_loss(output.float(), target.float())"})
        print(f"gradients {name}: {len(grads)}")

    for p in [*unet.parameters(), *tower.parameters()]:
        p.requires_grad_(True)
    x = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([411.0]),
         "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    gradients("unet", unet, lambda: unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample, x)
    gradients("text_encoder_open_clip", tower, lambda: penultimate(tower, ids), {"input_ids": ids}, prefix=OPENCLIP)


# ---------------------------------------------------------------- our DreamBooth, read by diffusers
def dreambooth_check(tmp: Path) -> dict:
    """OUR train_dreambooth.py on the tiny SD 2 (run by this interpreter, as a user would), then diffusers."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    data = tmp / "data"
    for kind, colour in (("instance", (200, 40, 40)), ("class", (40, 40, 200))):
        (data / kind).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (40, 40), tuple(c + 10 * i for c in colour)).save(data / kind / f"{i}.png")
    common = ["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", str(data / "instance"),
              "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1",
              "--max_train_steps", "2", "--seed", "0", "--with_prior_preservation", "--class_data_dir",
              str(data / "class"), "--class_prompt", "a photo of dog", "--num_class_images", "2",
              "--snr_gamma", "5.0", "--train_text_encoder"]
    full, lora = tmp / "full", tmp / "lora"
    for out, extra in ((full, ["--save_single_file"]), (lora, ["--rank", "4", "--lora_format", "kohya"])):
        subprocess.run([sys.executable, "train_dreambooth.py", *common, "--output_dir", str(out), *extra],
                       cwd=ROOT, check=True, capture_output=True)
    check = {}
    folder = StableDiffusionPipeline.from_pretrained(str(full))
    single = StableDiffusionPipeline.from_single_file(str(full / "full.safetensors"), config=str(full),
                                                      safety_checker=None, requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        want = getattr(folder, part).state_dict()
        ours = load_file(str(full / part / ("model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors")))
        ours = {k.removeprefix("text_model.") if k.removeprefix("text_model.") in want else k: v for k, v in ours.items()
                if not k.endswith("position_ids")}
        assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want), part
        got = getattr(single, part).state_dict()
        # the single file is fp16: the folder's tensors rounded to fp16, read back by diffusers' converter
        assert set(got) == set(want) and all(torch.equal(got[k], want[k].half().float()) for k in want), part
    check["full"] = ("StableDiffusionPipeline.from_pretrained read the trained folder (every tensor as written, "
                     "prediction_type v_prediction); from_single_file(config=folder) read the fp16 single file "
                     "(OpenCLIP layout, fused in_proj) to the folder's tensors in fp16, bit for bit")
    check["full_prediction_type"] = folder.scheduler.config.prediction_type
    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER))
    counts = {}
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        import logging
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("diffusers").addHandler(handler)
        logging.getLogger("peft").addHandler(handler)
        pipe.load_lora_weights(str(lora), weight_name=name, adapter_name=name.split(".")[0])
        logging.getLogger("diffusers").removeHandler(handler)
        logging.getLogger("peft").removeHandler(handler)
        warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        assert not warnings, warnings
        counts[name] = {part: sum(1 for n, _ in getattr(pipe, part).named_modules() if n.endswith(".lora_A"))
                        for part in ("unet", "text_encoder")}
        pipe.unload_lora_weights()
    check["lora"] = "load_lora_weights read both files with no warning (no missing or unexpected key)"
    check["lora_adapted_modules"] = counts
    return check


# ---------------------------------------------------------------- manifests of the real SD 2.1
def manifests() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True, upcast_attention=True, sample_size=96)
        vae = AutoencoderKL(**sd1.SD_V1_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                            hidden_act="gelu"))
        tower = open_clip_model(vocab_size=49408, context_length=77, width=1024, heads=16, layers=24)
    shapes = lambda sd: {k: list(v.shape) for k, v in sd.items()}  # noqa: E731
    text_keys = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in shapes(text.state_dict()).items()}
    text_keys["text_model.embeddings.position_ids"] = [1, 77]
    folder = {"unet/diffusion_pytorch_model.safetensors": shapes(unet.state_dict()),
              "vae/diffusion_pytorch_model.safetensors": shapes(vae.state_dict()),
              "text_encoder/model.safetensors": text_keys}
    cross = [t.startswith("CrossAttn") for t in unet.config.down_block_types]
    single = sd1.unet_to_ldm(unet.state_dict(), 4, 2, cross) | sd1.vae_to_ldm(vae.state_dict(), 4)
    single = shapes(single) | {OPENCLIP + k: list(v.shape) for k, v in tower.state_dict().items()}
    n_unet, n_vae = sum(k.startswith("model.") for k in single), sum(k.startswith("first_stage_model.") for k in single)
    n_text = sum(k.startswith(OPENCLIP) for k in single)
    (MANIFESTS / "sd_v2_diffusers.json").write_text(json.dumps(
        {"source": "stabilityai/stable-diffusion-2-1 diffusers folder, from diffusers/transformers classes on the meta "
                   "device (the text encoder under transformers 4's text_model. names, with position_ids)",
         "files": folder}, indent=0))
    (MANIFESTS / "sd_v2_single_file.json").write_text(json.dumps(
        {"source": f"v2-1_768-ema-pruned.safetensors layout: {n_unet} UNet + {n_vae} VAE + {n_text} OpenCLIP text-tower "
                   "tensors (open_clip 3.3 ViT-H-14 without its image tower, as LDM's FrozenOpenCLIPEmbedder keeps it), "
                   "plus the DDPM schedule buffers",
         "model_tensors": single, "schedule_buffers": {k: [1000] for k in sorted(sd1.ldm_schedule_buffers())}}, indent=0))
    print(f"manifests: folder {[len(v) for v in folder.values()]}, single file {n_unet} + {n_vae} + {n_text}")


def main() -> None:
    import tempfile
    pipe, tower = build()
    prove(pipe)
    tensors, meta = reference(pipe, tower)
    meta["pipeline"] = pipeline_images()
    lora_tensors, meta["lora"] = kohya_lora()
    tensors |= lora_tensors
    traces()
    if "--skip_dreambooth" not in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            meta["dreambooth"] = dreambooth_check(Path(tmp))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    meta["sha256"] = {str(p.relative_to(OUT)): __import__("hashlib").sha256(p.read_bytes()).hexdigest()
                      for p in sorted([*FOLDER.rglob("*"), SINGLE]) if p.is_file()}
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    manifests()
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"tests/fixtures/sd2: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
