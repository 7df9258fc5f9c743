"""Dev-only: a tiny random Stable Diffusion v1-family checkpoint in both public layouts, reference
outputs from diffusers, and key/shape manifests of the real SD v1.5 files.

    .venv-dev/bin/python tools/make_reference_sd.py

Writes under tests/fixtures/sd/:
- tiny_diffusers/: a `StableDiffusionPipeline.save_pretrained` folder (unet, vae, text_encoder,
  tokenizer, scheduler) with EVERY weight perturbed, so no zero-/one-initialised tensor can hide a
  mapping bug. The tokenizer is the real CLIP BPE truncated to its first merges.
- tiny_single.safetensors: the same tensors in the original CompVis/LDM single-file layout
  (`model.diffusion_model.*`, `first_stage_model.*` with 1x1-conv VAE attention,
  `cond_stage_model.transformer.*`, plus LDM's schedule buffers). Written with the inverse mapping
  below and PROVEN by loading it with diffusers' own `from_single_file` and comparing every tensor,
  bit for bit, with the folder.
- reference.safetensors: UNet eps and VAE posterior mean/std/sample and decode for fixed inputs.
and under tests/manifests/: sd_v1_diffusers.json and sd_v1_single_file.json (real SD v1.5 names
and shapes, from the reference classes on the meta device).
"""
from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "sd"
FOLDER = OUT / "tiny_diffusers"
SINGLE = OUT / "tiny_single.safetensors"
MANIFESTS = ROOT / "tests" / "manifests"
BPE = ROOT / ".venv-dev/lib/python3.11/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 500

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                latent_channels=4, norm_num_groups=4, sample_size=64)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2)  # SD v1.5's text_encoder ids
SD_V1_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
                       timestep_spacing="leading")
SD_V1_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 sample_size=512)


# ---------------------------------------------------------------- tokenizer: real CLIP BPE, truncated
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> int:
    """vocab.json / merges.txt in the real CLIP order: 256 byte tokens, the same with </w>, the
    merges, then <|startoftext|>, <|endoftext|>. Returns the vocabulary size."""
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")[1:1 + N_MERGES]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


# ---------------------------------------------------------------- inverse mapping: diffusers -> LDM
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(n_levels: int, layers: int, cross: list[bool]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, by walking LDM's flat input/output block lists."""
    p = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    k = 1
    for i in range(n_levels):
        for j in range(layers):
            p[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            p[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i < n_levels - 1:
            p[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    k = 0
    for i in range(n_levels):
        for j in range(layers + 1):
            p[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            p[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            k += 1
        # the upsampler sits in the level's last output block, after its attention if it has one
        p[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k - 1}.{2 if cross[n_levels - 1 - i] else 1}.conv"
    return p


def unet_to_ldm(sd: dict, n_levels: int, layers: int, cross: list[bool]) -> dict:
    prefixes = unet_prefixes(n_levels, layers, cross)
    out = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        head = max((p for p in prefixes if module == p or module.startswith(p + ".")), key=len)
        rest = module[len(head) + 1:]
        if ".resnets." in head:
            rest = UNET_RESNET[rest]
        new = prefixes[head] + (f".{rest}" if rest else "") + f".{leaf}"
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict, n_levels: int) -> dict:
    out = {}
    for key, value in sd.items():
        new = key
        for a, b in [(".mid_block.resnets.0.", ".mid.block_1."), (".mid_block.resnets.1.", ".mid.block_2."),
                     (".mid_block.attentions.0.", ".mid.attn_1."), (".conv_norm_out.", ".norm_out.")]:
            new = new.replace(a, b)
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else n_levels - 1 - int(parts[2])  # LDM: up.0 = highest res
            kind = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                parts = [parts[0], kind, str(level), "block", parts[4]] + parts[5:]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                parts = [parts[0], kind, str(level), "downsample" if kind == "down" else "upsample"] + parts[5:]
        new = ".".join(parts)
        if ".block" in new or ".block_" in new:
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in new:
            module, leaf = new.rsplit(".", 1)
            head, sub = module.split(".attn_1.")
            new = f"{head}.attn_1.{VAE_ATTENTION[sub]}.{leaf}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM stores the attention's linear maps as 1x1 convs
        out["first_stage_model." + new] = value
    return out


def ldm_schedule_buffers(num_steps: int = 1000) -> dict:
    """The 12 DDPM schedule buffers an LDM LatentDiffusion checkpoint carries (SD v1: scaled_linear)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_steps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    bufs = dict(betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=ac.sqrt(),
                sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(), log_one_minus_alphas_cumprod=(1 - ac).log(),
                sqrt_recip_alphas_cumprod=(1 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
                posterior_variance=post_var, posterior_log_variance_clipped=post_var.clamp(min=1e-20).log(),
                posterior_mean_coef1=betas * ac_prev.sqrt() / (1 - ac),
                posterior_mean_coef2=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))
    return {k: v.float() for k, v in bufs.items()}


def to_single_file(unet, vae, text_encoder) -> dict:
    ucfg, vcfg = unet.config, vae.config
    cross = [t.startswith("CrossAttn") for t in ucfg.down_block_types]
    sd = unet_to_ldm(unet.state_dict(), len(ucfg.block_out_channels), ucfg.layers_per_block, cross)
    sd |= vae_to_ldm(vae.state_dict(), len(vcfg.block_out_channels))
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; the public files have it
    sd |= {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
           for k, v in text_encoder.state_dict().items()}
    n_pos = text_encoder.config.max_position_embeddings
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    return sd | ldm_schedule_buffers()


# ---------------------------------------------------------------- the tiny pipeline
def perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def build_folder():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tok_dir = OUT / "_tokenizer_tmp"
    vocab_size = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="<|endoftext|>", model_max_length=77)
    ids = tokenizer("a photo of an astronaut", padding="max_length", max_length=77).input_ids
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if ids[0] != vocab_size - 2 or ids[-1] != end or len(ids) != 77:
        sys.exit(f"tokenizer check failed: {ids}")

    unet = UNet2DConditionModel(**TINY_UNET).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TINY_CLIP)).eval()
    for m in (unet, vae, text_encoder):
        perturb(m, gen)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SD_V1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    public_layout(FOLDER, vocab_dir=tok_dir)
    shutil.rmtree(tok_dir)
    return pipe


def public_layout(folder: Path, *, vocab_dir: Path) -> None:
    """Make two files look like the public SD v1.5 folder rather than what today's libraries write:
    - text_encoder/model.safetensors: transformers >= 5.6 saves CLIPTextModel without the `text_model.`
      prefix; the public file (saved by transformers 4.x) has `text_model.*` and the
      `text_model.embeddings.position_ids` buffer;
    - tokenizer/: the public folder holds vocab.json + merges.txt, no tokenizer.json."""
    from safetensors.torch import load_file
    path = folder / "text_encoder" / "model.safetensors"
    sd = {"text_model." + k: v for k, v in load_file(str(path)).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(TINY_CLIP["max_position_embeddings"])[None]
    save_file(sd, str(path), metadata={"format": "pt"})
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, folder / "tokenizer" / name)
    (folder / "tokenizer" / "tokenizer.json").unlink()


def check_folder_reloads(pipe) -> None:
    """diffusers/transformers must read the folder back to the very same tensors and tokens."""
    from diffusers import StableDiffusionPipeline
    loaded = StableDiffusionPipeline.from_pretrained(str(FOLDER), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        if set(want) != set(got) or any(not torch.equal(want[k], got[k]) for k in want):
            sys.exit(f"{FOLDER}/{name} does not reload to the same tensors")
    text = ["a photo of an astronaut riding a horse", ""]
    a = pipe.tokenizer(text, padding="max_length", max_length=77).input_ids
    b = loaded.tokenizer(text, padding="max_length", max_length=77).input_ids
    if a != b or b[1][1] != loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>"):
        sys.exit(f"tokenizer does not reload to the same ids: {a} vs {b}")
    print("folder reloads bit-identical; tokenizer pads with <|endoftext|>")


def prove_single_file(pipe) -> None:
    """Load tiny_single.safetensors with diffusers' own converter and demand bit-identical tensors."""
    from diffusers import StableDiffusionPipeline
    loaded = StableDiffusionPipeline.from_single_file(
        str(SINGLE), config=str(FOLDER), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        if set(want) != set(got):
            sys.exit(f"from_single_file {name}: key sets differ: {sorted(set(want) ^ set(got))[:10]}")
        bad = [k for k in want if want[k].shape != got[k].shape or not torch.equal(want[k], got[k])]
        if bad:
            sys.exit(f"from_single_file {name}: {len(bad)} tensors differ, e.g. {bad[:5]}")
        print(f"from_single_file {name}: {len(want)} tensors bit-identical")


def reference_outputs(pipe) -> dict:
    gen = torch.Generator().manual_seed(1)
    ref = {}
    with torch.no_grad():
        sample = torch.randn(3, 4, 16, 12, generator=gen)
        ref["unet.sample"] = sample
        ref["unet.timesteps"] = torch.tensor([1.0, 500.0, 999.0])
        ref["unet.timesteps_int"] = torch.tensor([981, 981, 21])
        ref["unet.encoder_hidden_states"] = torch.randn(3, 77, 32, generator=gen)
        ref["unet.eps"] = pipe.unet(sample, ref["unet.timesteps"], ref["unet.encoder_hidden_states"]).sample
        ref["unet.eps_int"] = pipe.unet(sample, ref["unet.timesteps_int"], ref["unet.encoder_hidden_states"]).sample
        image = torch.rand(2, 3, 32, 48, generator=gen) * 2 - 1
        ref["vae.image"] = image
        post = pipe.vae.encode(image).latent_dist
        ref["vae.mean"], ref["vae.std"] = post.mean, post.std
        ref["vae.sample_seed7"] = post.sample(generator=torch.Generator().manual_seed(7))
        ref["vae.latents"] = torch.randn(2, 4, 6, 10, generator=gen)
        ref["vae.decoded"] = pipe.vae.decode(ref["vae.latents"]).sample
    return {k: v.contiguous() for k, v in ref.items()}


# ---------------------------------------------------------------- manifests of the real SD v1.5
def write_manifests() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # defaults are SD v1's
        vae = AutoencoderKL(**SD_V1_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu"))
    shapes = lambda sd: {k: list(v.shape) for k, v in sd.items()}  # noqa: E731
    folder = {"unet/diffusion_pytorch_model.safetensors": shapes(unet.state_dict()),
              "vae/diffusion_pytorch_model.safetensors": shapes(vae.state_dict()),
              "text_encoder/model.safetensors": {"text_model." + k: v for k, v in shapes(text.state_dict()).items()}}
    single = to_single_file(unet, vae, text)
    schedule = sorted(ldm_schedule_buffers())
    model = {k: list(v.shape) for k, v in single.items() if k.split(".")[0] not in schedule}
    n_model = len(model)
    if n_model != 1131:
        sys.exit(f"single-file manifest has {n_model} model tensors, the public v1-5 file has 1131")
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    (MANIFESTS / "sd_v1_diffusers.json").write_text(json.dumps(
        {"source": "runwayml/stable-diffusion-v1-5 diffusers folder, from diffusers/transformers classes on "
                   "the meta device (current key names)", "files": folder}, indent=0))
    (MANIFESTS / "sd_v1_single_file.json").write_text(json.dumps(
        {"source": "v1-5-pruned-emaonly.safetensors layout: 686 UNet + 248 VAE + 197 text-encoder tensors "
                   "(incl. position_ids) = 1131 model tensors, plus the DDPM schedule buffers",
         "model_tensors": model, "schedule_buffers": {k: [1000] for k in schedule}}, indent=0))
    print(f"manifests: folder {[len(v) for v in folder.values()]}, single file {n_model} model tensors")


def main() -> None:
    pipe = build_folder()
    check_folder_reloads(pipe)
    single = to_single_file(pipe.unet, pipe.vae, pipe.text_encoder)
    save_file({k: v.contiguous() for k, v in single.items()}, str(SINGLE))
    prove_single_file(pipe)
    save_file(reference_outputs(pipe), str(OUT / "reference.safetensors"))
    write_manifests()
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"tests/fixtures/sd: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
