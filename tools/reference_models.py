"""The reference implementations (transformers, diffusers, peft) that the benchmarks race against, built in this
one dev-only place, beside the fixture generators: nothing in the package, the tests or bench/ imports
those libraries itself. The whole-process benches run the reference side as its users run it, from here:
transformers' image-classification pipeline, and diffusers' DreamBooth example script's loop (that script
is not installed with diffusers, so a compact reproduction of it lives here). Install them with
`pip install -r requirements-dev.txt`; each function imports its library only when called, and
`version(name)` says whether it is there without importing it.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path


def version(package: str) -> str | None:
    """The installed version of `package` ("transformers", "diffusers"), or None when it is absent."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---- transformers ---------------------------------------------------------------------------------
def vit_classifier(folder: str | Path, **kwargs):
    """transformers' ViTForImageClassification read from a transformers-layout folder."""
    from transformers import ViTForImageClassification
    return ViTForImageClassification.from_pretrained(folder, **kwargs)


def clip_text_model(fields: dict):
    """transformers' CLIPTextModel, randomly initialised, with the given CLIPTextConfig fields."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**fields))


def clip_tokenizer(folder: str | Path):
    """transformers' CLIPTokenizer read from a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder)


# ---- diffusers ------------------------------------------------------------------------------------
def sd_v1_unet():
    """diffusers' UNet2DConditionModel with SD v1's config (its defaults, text width 768), random init."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(cross_attention_dim=768, sample_size=64)


def autoencoder_kl(**config):
    """diffusers' AutoencoderKL with the given config fields, random init."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(**config)


def add_dreambooth_lora(unet, *, rank: int, weight_dtype):
    """diffusers' examples/dreambooth/train_dreambooth_lora.py's set-up of its UNet for training: frozen,
    cast to its weight_dtype (bf16/fp16 from --mixed_precision), a peft adapter of rank r (alpha r,
    gaussian init) on its target modules; the adapter is upcast to fp32 only under fp16 (cast_training_params),
    so under bf16 it trains in bf16. Returns the parameters its AdamW moves."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    if weight_dtype == torch.float16:
        cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


# ---- OpenCV's Haar cascades (bench/faces.py) ------------------------------------------------------
def opencv():
    """(the cv2 module, a note naming its version), or (None, why not) when OpenCV 4.x is not installed."""
    try:
        import cv2
    except ImportError:
        return None, "OpenCV not installed"
    if not hasattr(cv2, "CascadeClassifier"):
        return None, f"OpenCV {cv2.__version__} has no CascadeClassifier (needs 4.x)"
    return cv2, f"OpenCV {cv2.__version__}"


# ---- transformers' image-classification pipeline (bench/predict_emotion.py) ------------------------
def write_vit_classifier(folder: str | Path, *, labels: list[str]) -> Path:
    """A full-size ViT-B/16 classifier folder (224x224, 16x16 patches, 12 layers of width 768: transformers'
    ViTConfig defaults, the size of dima806's emotion model) with random weights and dima806's preprocessing
    (resize to 224x224, mean = std = 0.5), written once by transformers' own save_pretrained."""
    import shutil

    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    scratch = folder.with_name(folder.name + ".partial")     # renamed into place when complete
    shutil.rmtree(scratch, ignore_errors=True)
    torch.manual_seed(0)
    config = ViTConfig(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(scratch)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=2).save_pretrained(scratch)
    scratch.rename(folder)
    return folder


def classify_with_pipeline(model: str, images: str, out: str, dtype: str, batch_size: str) -> None:
    """What transformers' docs show for classifying images: `pipeline("image-classification", model=FOLDER)`
    called on a list of image paths (it opens them itself: EXIF orientation, RGB), `batch_size` images per
    forward pass, top 5 labels; written as predict_emotion.py writes them, one JSON line per image into `out`.
    Arguments are strings: bench/predict_emotion.py runs it as `python -c` with sys.argv."""
    import json

    import torch
    from transformers import pipeline
    files = sorted(str(p) for p in Path(images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    classifier = pipeline("image-classification", model=model, device="cpu",
                          dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    results = classifier(files, batch_size=int(batch_size), top_k=5)
    with open(out, "w") as f:
        for path, predictions in zip(files, results):
            f.write(json.dumps({"image": path, "predictions": predictions}) + "\n")


# ---- diffusers' DreamBooth example (bench/train_dreambooth.py) -------------------------------------
def diffusers_dreambooth(argv: list[str] | None = None) -> None:
    """diffusers' examples/dreambooth/train_dreambooth.py (not installed with the package), reproduced for
    what bench/train_dreambooth.py runs: the UNet fine-tuned with prior preservation, the class images already
    in --class_data_dir, one process. As the script does it, in its order: accelerate's Accelerator with
    --mixed_precision (autocast around the prepared UNet's forward only); the slow CLIP tokenizer
    (use_fast=False), DDPMScheduler, CLIPTextModel, AutoencoderKL and UNet2DConditionModel read from the
    folder in fp32; the VAE and text encoder frozen, then moved to weight_dtype (fp32, or bf16/fp16 under
    --mixed_precision) after accelerator.prepare; UNet gradient checkpointing; AdamW (betas 0.9/0.999, weight
    decay 1e-2, eps 1e-8) on the UNet; its dataset (torchvision's Resize, Random- or CenterCrop, Normalize; the
    prompts tokenized per example; instance then class examples in one batch), shuffled; per step: the VAE
    posterior sample x scaling_factor, noise, random timesteps, add_noise, the text states computed each step,
    one UNet call, instance and prior MSE in fp32 (loss = instance + prior_loss_weight x prior), backward,
    gradient clipping to 1.0, optimizer and constant-schedule steps, zero_grad(set_to_none=False) (the
    script's default: the gradients stay allocated); at the end the pipeline re-read with the trained UNet
    and text encoder and save_pretrained into --output_dir.
    Left out, none of which runs at these settings: class-image generation, checkpoints (every 500 steps),
    validation, trackers (its default tensorboard event files), --train_text_encoder, 8-bit Adam, xformers,
    pre-computed text embeddings, --snr_gamma, --offset_noise, the hub."""
    import argparse
    import math

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from PIL.ImageOps import exif_transpose
    from torchvision import transforms
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel

    p = argparse.ArgumentParser(description="diffusers' train_dreambooth.py at bench/train_dreambooth.py's settings")
    for flag in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "class_data_dir",
                 "class_prompt", "output_dir"):
        p.add_argument(f"--{flag}")
    p.add_argument("--with_prior_preservation", action="store_true")
    p.add_argument("--prior_loss_weight", type=float, default=1.0)
    p.add_argument("--num_class_images", type=int, default=100)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--max_train_steps", type=int)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=5e-6)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    prior, folder = args.with_prior_preservation, args.pretrained_model_name_or_path

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if args.seed is not None:
        set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")  # the class its config names
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)

    image_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def tokenize(prompt):
        return tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    def read(path):
        image = exif_transpose(Image.open(path))
        return image_transforms(image if image.mode == "RGB" else image.convert("RGB"))

    class DreamBoothDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.instance_paths = list(Path(args.instance_data_dir).iterdir())
            self.class_paths = list(Path(args.class_data_dir).iterdir()) if prior else []
            self.num_class = min(len(self.class_paths), args.num_class_images)
            self.length = max(self.num_class, len(self.instance_paths))

        def __len__(self):
            return self.length

        def __getitem__(self, i):
            example = {"instance_images": read(self.instance_paths[i % len(self.instance_paths)]),
                       "instance_prompt_ids": tokenize(args.instance_prompt)}
            if prior:
                example.update(class_images=read(self.class_paths[i % self.num_class]),
                               class_prompt_ids=tokenize(args.class_prompt))
            return example

    def collate_fn(examples):   # instance examples, then class examples: one UNet call for both
        kinds = ["instance", "class"] if prior else ["instance"]
        pixel_values = torch.stack([e[f"{k}_images"] for k in kinds for e in examples])
        return {"input_ids": torch.cat([e[f"{k}_prompt_ids"] for k in kinds for e in examples]),
                "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float()}

    train_dataloader = torch.utils.data.DataLoader(DreamBoothDataset(), batch_size=args.train_batch_size,
                                                   shuffle=True, collate_fn=collate_fn, num_workers=0)
    max_train_steps = args.max_train_steps or len(train_dataloader)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500 * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    global_step = 0
    progress_bar = tqdm(range(max_train_steps), desc="Steps")
    for epoch in range(math.ceil(max_train_steps / len(train_dataloader))):
        unet.train()
        for batch in train_dataloader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                model_input = model_input * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                          device=model_input.device).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"].to(text_encoder.device), attention_mask=None)[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                if prior:
                    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                    target, target_prior = torch.chunk(target, 2, dim=0)
                    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                if prior:
                    loss = loss + args.prior_loss_weight * prior_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=False)
            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
            progress_bar.set_postfix(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            if global_step >= max_train_steps:
                break

    accelerator.wait_for_everyone()
    pipeline = DiffusionPipeline.from_pretrained(folder, unet=accelerator.unwrap_model(unet),
                                                 text_encoder=accelerator.unwrap_model(text_encoder))
    scheduler_args = {}
    if "variance_type" in pipeline.scheduler.config:   # trained on the simplified objective: no learned variance
        variance_type = pipeline.scheduler.config.variance_type
        learned = variance_type in ("learned", "learned_range")
        scheduler_args["variance_type"] = "fixed_small" if learned else variance_type
    pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, **scheduler_args)
    pipeline.save_pretrained(args.output_dir)
    accelerator.end_training()


# ---- SD v1.5, 2.1 and SDXL text to image, as diffusers' docs drive it (bench/sample.py) ------------------
def write_random_sd15(folder: Path) -> Path:
    """A full-size SD v1.5 diffusers folder with random weights, made and saved by diffusers itself."""
    from diffusers import PNDMScheduler
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    return _write_random_sd(folder, text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
                            unet=dict(cross_attention_dim=768, sample_size=64), scheduler=scheduler,
                            pad_token="<|endoftext|>", vae_sample_size=512)


def write_random_sd21(folder: Path) -> Path:
    """A full-size stabilityai/stable-diffusion-2-1 diffusers folder with random weights, made and saved by
    diffusers itself: its UNet (Linear projections, 5/10/20/20 heads, upcast attention, 1024-wide text states,
    96 x 96 latents), SD v1's VAE, OpenCLIP ViT-H/14's text tower as SD 2 keeps it (23 gelu layers of width
    1024), the real vocabulary padded with "!", and its DDIM v-prediction scheduler."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                              prediction_type="v_prediction")
    return _write_random_sd(folder, text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                              num_attention_heads=16, hidden_act="gelu", projection_dim=512),
                            unet=dict(cross_attention_dim=1024, sample_size=96, attention_head_dim=(5, 10, 20, 20),
                                      use_linear_projection=True, upcast_attention=True),
                            scheduler=scheduler, pad_token="!", vae_sample_size=768)


def _write_random_sd(folder: Path, *, text: dict, unet: dict, scheduler, pad_token: str, vae_sample_size: int) -> Path:
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(folder.parent / (folder.name + ".tokenizer"), pad_token)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text))
    unet_model = UNet2DConditionModel(**unet)
    vae = _sd_vae(sample_size=vae_sample_size)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_model,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_random_sdxl(folder: Path) -> Path:
    """A full-size stabilityai/stable-diffusion-xl-base-1.0 diffusers folder with random weights, made and saved
    by diffusers itself, every component in bf16 (6.94 GB: the UNet's 2.57B parameters, CLIP ViT-L/14's and
    OpenCLIP ViT-bigG/14's text towers, the VAE). The public repo ships fp32 files and an fp16 variant; bf16
    is the half precision a CPU computes in hardware, and 14 GB of fp32 weights (with safetensors' copy of a
    file's bytes while saving it) would crowd a 24 GB machine. The configs are the published ones (three
    UNet levels with 1/2/10 transformer blocks and text_time micro-conditioning, the VAE's 0.13025 and
    force_upcast, both tokenizers over the real CLIP vocabulary, the second padding with "!",
    EulerDiscreteScheduler "leading"). Each part is cast to bf16 as soon as it is built, so the writer never
    holds the whole fp32 model (peak RSS 10.8 GB, the fp32 UNet; 2 min 11 s here)."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    scratch = folder.parent / (folder.name + ".tokenizer")
    text = dict(vocab_size=49408, max_position_embeddings=77)
    parts = dict(
        unet=lambda: UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        text_encoder=lambda: CLIPTextModel(CLIPTextConfig(**text, hidden_size=768, intermediate_size=3072,
                                                          num_hidden_layers=12, num_attention_heads=12,
                                                          hidden_act="quick_gelu", projection_dim=768)),
        text_encoder_2=lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **text, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280)),
        vae=lambda: _sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True))
    models = {name: build().to(torch.bfloat16) for name, build in parts.items()}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(**models, tokenizer=_clip_tokenizer(scratch, "<|endoftext|>"),
                                     tokenizer_2=_clip_tokenizer(scratch, "!"), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    scratch_folder = folder.with_name(folder.name + ".partial")     # renamed into place when complete
    pipe.save_pretrained(str(scratch_folder), safe_serialization=True)
    scratch_folder.rename(folder)
    return folder


def _clip_tokenizer(scratch: Path, pad_token: str):
    """transformers' CLIPTokenizer over the real CLIP BPE vocabulary (ours, written into `scratch`), padding
    with `pad_token`: "<|endoftext|>" as OpenAI's CLIP, "!" as OpenCLIP's (SD 2.x, SDXL's second)."""
    from transformers import CLIPTokenizer

    from clip.tokenizer import CLIPTokenizer as OurTokenizer
    vocab = OurTokenizer.from_pretrained(None)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "vocab.json").write_text(json.dumps(vocab.vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in vocab.merges) + "\n")
    return CLIPTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def _sd_vae(**config):
    """diffusers' AutoencoderKL with SD v1's architecture (which SD 2.x and SDXL keep), random init."""
    return autoencoder_kl(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         **config)


def sample_with_pipeline(folder: str, out: str, size: str, steps: str, dtype: str, n: str, prompt: str) -> None:
    """What diffusers' docs show: `from_pretrained(folder, torch_dtype=...)`, guidance 7.5, a seeded generator,
    each image saved as PNG. SD v1/2: StableDiffusionPipeline with DDIM from its config (sample.py's default
    sampler); SDXL (model_index.json names StableDiffusionXLPipeline): that pipeline with its own scheduler
    (SDXL base's EulerDiscreteScheduler, which bench/sample.py gives ours as --sampler euler)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch_dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(prompt, height=int(size), width=int(size), num_inference_steps=int(steps),
                  num_images_per_prompt=int(n), guidance_scale=7.5, generator=torch.Generator().manual_seed(42)).images
    for i, image in enumerate(images):
        image.save(f"{out}/{i:05d}.png")
