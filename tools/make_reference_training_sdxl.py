"""Dev-only: reference DreamBooth-LoRA steps on SDXL, for tests/test_training_parity_sdxl.py.

    .venv-dev/bin/python tools/make_reference_training_sdxl.py

Run after tools/make_reference_sdxl.py (it trains tests/fixtures/sdxl/tiny_diffusers, the tiny SDXL of
diffusers' own SDXL test shapes). As tools/make_reference_training.py does for SD v1, it runs diffusers'
examples/dreambooth/train_dreambooth_lora_sdxl.py's training loop for 3 optimizer steps on fixed batches and
fixed random draws, and records what each step did. Writes under tests/fixtures/training/sdxl/:
- inputs.safetensors: per micro-batch 16x16 uint8 pixels, the draws (the VAE posterior sample's noise, the
  noise, the timesteps), and each row's micro-conditioning as the script's dataset and collate_fn give it:
  `original_sizes` and `crop_top_lefts` (a class row repeats its instance example's, as the script's
  collate_fn does) and the `time_ids` its compute_time_ids makes of them; the prompts' token ids of both
  tokenizers (its tokenize_prompt).
- lora_<case>.safetensors: per step the loss and its parts, the learning rates and the gradient norm
  (reference.json); the LoRA weights before step 1 (peft's gaussian init), step 2's gradients (before
  clipping; step 1's A-gradients are 0, B being 0) and the weights after step 3, under peft's keys ("unet.<module>.lora_A.weight",
  "text_encoder.text_model.encoder...", "text_encoder_2.text_model.encoder...").
- dataset.json: the script's DreamBoothDataset micro-conditioning (original size, crop top-left) of a few
  image sizes at --resolution 16 with --center_crop, through its torchvision transforms.
- ours_lora.safetensors: train_dreambooth.py's own pytorch_lora_weights.safetensors of a 2-step run on the tiny
  SDXL (OURS_RUN), which StableDiffusionXLPipeline.load_lora_weights must read whole: every tensor lands in its
  adapters, equal, and they adapt exactly the file's modules (else this tool stops); ours_in_diffusers.safetensors:
  what the pipeline computes with it (prompt embeddings, the UNet on a fixed input, a 32x32 image fused at
  scale 1 with its Euler scheduler), which our sample.py --lora must give.
- reference.json: the cases, the script's defaults they use, the keys of the script's own saved LoRA file
  (save_lora_weights), the library versions and the CPU.

Regenerating is byte-identical: one thread, fixed seeds, sorted keys.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from common.precision import native_on_cpu  # noqa: E402
from common.state_dict import write_safetensors  # noqa: E402
from make_reference_training import normalize, text_key, versions  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "training" / "sdxl"
TINY_SDXL = ROOT / "tests" / "fixtures" / "sdxl" / "tiny_diffusers"
RESOLUTION, STEPS = 16, 3
PROMPTS = ("a photo of sks dog", "a photo of dog")   # instance, class
# train_dreambooth_lora_sdxl.py's defaults, which the cases keep: AdamW lr 1e-4 (the UNet's LoRA), 5e-6 for the
# text encoders' (--text_encoder_lr), weight decay 1e-4 and 1e-3 (--adam_weight_decay_text_encoder), betas
# 0.9/0.999, eps 1e-8, a constant schedule, clipping at 1.0, prior loss weight 1, rank 4.
BASE = dict(rank=4, learning_rate=1e-4, text_encoder_lr=5e-6, adam_weight_decay=1e-4,
            adam_weight_decay_text_encoder=1e-3, max_grad_norm=1.0, prior_loss_weight=1.0, mixed_precision="no")
CASES = {
    # 1 instance + 1 class image per micro-batch, both text encoders' LoRA trained: every part of the step. At
    # --train_batch_size 1: the script repeats its (instance, class) prompt pair per example, which pairs
    # prompts with images only at batch 1 with prior preservation (docs/sdxl.md).
    "a_prior_text_encoders": dict(BASE, train_text_encoder=True, with_prior_preservation=True, train_batch_size=1,
                                  gradient_accumulation_steps=1),
    # 2 instance images, the UNet's LoRA alone (the script's precomputed prompt embeddings), 2 micro-batches a step.
    "b_unet_accumulation": dict(BASE, train_text_encoder=False, with_prior_preservation=False, train_batch_size=2,
                                gradient_accumulation_steps=2),
}
MICRO_BATCHES = STEPS * 2   # case b's 2 per step; case a uses the first STEPS
ROWS = 2                     # rows per micro-batch in both cases
# Each micro-batch's instance images' sizes before resizing and crops: train_dreambooth_lora_sdxl.py's
# `original_sizes` and `crop_top_lefts` (varied, so that a swapped or misplaced field cannot pass).
SIZES = [((24, 40), (0, 7)), ((48, 32), (12, 0)), ((16, 16), (0, 0)), ((20, 30), (2, 5)), ((33, 17), (9, 0)),
         ((64, 16), (30, 0)), ((40, 24), (5, 0)), ((16, 21), (0, 2)), ((30, 20), (4, 0)), ((18, 18), (1, 1)),
         ((50, 25), (7, 0)), ((16, 40), (0, 12))]
DATASET_SIZES = [(32, 48), (48, 32), (30, 20), (16, 21), (16, 16)]   # (h, w): exact resizes (see dataset_reference)


def make_inputs() -> dict[str, torch.Tensor]:
    """The micro-batches: pixels, draws (float32 standard normals, int64 timesteps, one seeded generator; the
    first row of each at a timestep below 100), each row's original size and crop and the script's time_ids of
    them (case a's second row is its class image: the instance's conditioning, as the collate_fn repeats it)."""
    from transformers import AutoTokenizer
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, sub in enumerate(("tokenizer", "tokenizer_2")):
        tokenizer = AutoTokenizer.from_pretrained(str(TINY_SDXL), subfolder=sub, use_fast=False)
        out[f"input_ids_{i + 1}"] = torch.cat([tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length,
                                                         truncation=True, return_tensors="pt").input_ids for p in PROMPTS])
    latent = (4, RESOLUTION // 4, RESOLUTION // 4)     # the tiny SDXL's VAE: 3 levels, a factor of 4
    for k in range(MICRO_BATCHES):
        out[f"{k}.pixels"] = torch.randint(0, 256, (ROWS, 3, RESOLUTION, RESOLUTION), generator=g, dtype=torch.uint8)
        out[f"{k}.posterior"] = torch.randn((ROWS, *latent), generator=g)
        out[f"{k}.noise"] = torch.randn((ROWS, *latent), generator=g)
        t = torch.randint(0, 1000, (ROWS,), generator=g)
        t[0] = torch.randint(0, 100, (1,), generator=g)
        out[f"{k}.timesteps"] = t
        sizes = [SIZES[2 * k % len(SIZES)], SIZES[(2 * k + 1) % len(SIZES)]]
        out[f"{k}.original_sizes"] = torch.tensor([s for s, _ in sizes])
        out[f"{k}.crop_top_lefts"] = torch.tensor([c for _, c in sizes])
    return out


def compute_time_ids(original_size, crops_coords_top_left, weight_dtype) -> torch.Tensor:
    """train_dreambooth_lora_sdxl.py's compute_time_ids, as the script writes it."""
    target_size = (RESOLUTION, RESOLUTION)
    add_time_ids = list(original_size + crops_coords_top_left + target_size)
    add_time_ids = torch.tensor([add_time_ids])
    return add_time_ids.to(dtype=weight_dtype)


def batch_conditioning(inputs: dict, k: int, prior: bool) -> tuple[list, list]:
    """The script's batch["original_sizes"] and batch["crop_top_lefts"] of micro-batch k: with prior
    preservation its collate_fn appends each example's own (instance) size and crop again for the class row."""
    sizes = [tuple(s.tolist()) for s in inputs[f"{k}.original_sizes"]]
    crops = [tuple(c.tolist()) for c in inputs[f"{k}.crop_top_lefts"]]
    if prior:
        sizes, crops = sizes[:1] * 2, crops[:1] * 2
    return sizes, crops


def named_lora(unet, text_encoders) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters under the saved names: peft's keys without the adapter name, prefixed by the part."""
    out = {}
    for part, model in (("unet", unet), *zip(("text_encoder", "text_encoder_2"), text_encoders)):
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:
                name = name.replace(".default.", ".")
                out[f"{part}.{text_key(name) if part != 'unet' else name}"] = p
    return out


def lora_sdxl_reference(case: dict, inputs: dict) -> tuple[dict, dict, object]:
    """train_dreambooth_lora_sdxl.py's model set-up and training loop, its lines in their order, for STEPS
    optimizer steps; the batches and draws come from `inputs` (latent_dist.sample() = mean + std * the recorded
    draw; torch.randn_like and torch.randint: the recorded noise and timesteps). Returns the record, the
    scalars, and the pipeline parts (to save the LoRA as the script does)."""
    import itertools

    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    folder, prior = str(TINY_SDXL), case["with_prior_preservation"]
    accelerator = Accelerator(gradient_accumulation_steps=case["gradient_accumulation_steps"],
                              mixed_precision=case["mixed_precision"], cpu=True)
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder_one.requires_grad_(False)
    text_encoder_two.requires_grad_(False)
    unet.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(case["mixed_precision"], torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)      # the script: "always in float32 to avoid NaN losses"
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    torch.manual_seed(1)                                  # peft's gaussian init of A draws from here
    unet.add_adapter(LoraConfig(r=case["rank"], lora_alpha=case["rank"], init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if case["train_text_encoder"]:
        # text_encoder.add_adapter(config) in the script; transformers 5.24's add_adapter refuses peft 0.21.2
        # (tools/make_reference_training.py), so the peft call it makes, as it makes it
        text_config = LoraConfig(r=case["rank"], lora_alpha=case["rank"], init_lora_weights="gaussian",
                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        inject_adapter_in_model(text_config, text_encoder_one, adapter_name="default")
        inject_adapter_in_model(text_config, text_encoder_two, adapter_name="default")
    unet_lora_parameters = list(filter(lambda p: p.requires_grad, unet.parameters()))
    params_to_optimize = [{"params": unet_lora_parameters, "lr": case["learning_rate"]}]
    if case["train_text_encoder"]:
        text_lora_parameters_one = list(filter(lambda p: p.requires_grad, text_encoder_one.parameters()))
        text_lora_parameters_two = list(filter(lambda p: p.requires_grad, text_encoder_two.parameters()))
        for params in (text_lora_parameters_one, text_lora_parameters_two):
            params_to_optimize.append({"params": params, "weight_decay": case["adam_weight_decay_text_encoder"],
                                       "lr": case["text_encoder_lr"] or case["learning_rate"]})
    named = named_lora(unet, (text_encoder_one, text_encoder_two))
    initial = {k: v.detach().clone() for k, v in named.items()}
    optimizer = torch.optim.AdamW(params_to_optimize, betas=(0.9, 0.999), weight_decay=case["adam_weight_decay"],
                                  eps=1e-8)
    tokens = [inputs["input_ids_1"], inputs["input_ids_2"]]           # (instance, class) of each tokenizer

    def encode_prompt(text_encoders, text_input_ids_list):   # the script's encode_prompt
        prompt_embeds_list = []
        for text_encoder, text_input_ids in zip(text_encoders, text_input_ids_list):
            prompt_embeds = text_encoder(text_input_ids, output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = prompt_embeds[0]
            prompt_embeds = prompt_embeds[-1][-2]
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
        prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
        return prompt_embeds, pooled_prompt_embeds.view(bs_embed, -1)

    rows = slice(0, 2) if prior else slice(0, 1)              # the script's prompts: (instance[, class])
    if not case["train_text_encoder"]:
        with torch.no_grad():
            prompt_embeds, unet_add_text_embeds = encode_prompt([text_encoder_one, text_encoder_two],
                                                                [t[rows] for t in tokens])
    else:
        tokens_one, tokens_two = tokens[0][rows], tokens[1][rows]
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500 * accelerator.num_processes,
                                 num_training_steps=STEPS * accelerator.num_processes)
    if case["train_text_encoder"]:
        unet, text_encoder_one, text_encoder_two, optimizer, lr_scheduler = accelerator.prepare(
            unet, text_encoder_one, text_encoder_two, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    record, micro, global_step = {}, 0, 0
    scalars = {"loss": [], "instance_loss": [], "prior_loss": [], "lr": [], "text_encoder_lr": [], "grad_norm": []}
    unet.train()
    if case["train_text_encoder"]:
        text_encoder_one.train()
        text_encoder_two.train()
    while global_step < STEPS:
        k = micro
        micro += 1
        with accelerator.accumulate(unet):
            pixel_values = normalize(inputs[f"{k}.pixels"]).to(dtype=vae.dtype)
            latent_dist = vae.encode(pixel_values).latent_dist
            model_input = latent_dist.mean + latent_dist.std * inputs[f"{k}.posterior"].to(latent_dist.mean.dtype)
            model_input = model_input * vae.config.scaling_factor
            model_input = model_input.to(weight_dtype)
            noise = inputs[f"{k}.noise"].to(model_input.dtype)
            bsz = model_input.shape[0]
            timesteps = inputs[f"{k}.timesteps"].long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            sizes, crops = batch_conditioning(inputs, k, prior)
            add_time_ids = torch.cat([compute_time_ids(original_size=s, crops_coords_top_left=c,
                                                       weight_dtype=weight_dtype) for s, c in zip(sizes, crops)])
            record[f"time_ids.{k}"] = add_time_ids.float()
            elems_to_repeat_text_embeds = bsz // 2 if prior else bsz
            if not case["train_text_encoder"]:
                unet_added_conditions = {"time_ids": add_time_ids,
                                         "text_embeds": unet_add_text_embeds.repeat(elems_to_repeat_text_embeds, 1)}
                prompt_embeds_input = prompt_embeds.repeat(elems_to_repeat_text_embeds, 1, 1)
            else:
                unet_added_conditions = {"time_ids": add_time_ids}
                prompt_embeds, pooled_prompt_embeds = encode_prompt([text_encoder_one, text_encoder_two],
                                                                    [tokens_one, tokens_two])
                unet_added_conditions.update({"text_embeds": pooled_prompt_embeds.repeat(elems_to_repeat_text_embeds, 1)})
                prompt_embeds_input = prompt_embeds.repeat(elems_to_repeat_text_embeds, 1, 1)
            model_pred = unet(noisy_model_input, timesteps, prompt_embeds_input,
                              added_cond_kwargs=unet_added_conditions, return_dict=False)[0]
            target = noise                                   # epsilon prediction (SDXL base's)
            if prior:
                model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            instance_loss = loss.detach().clone()
            if prior:
                loss = loss + case["prior_loss_weight"] * prior_loss
            scalars["loss"].append(loss.item())
            scalars["instance_loss"].append(instance_loss.item())
            scalars["prior_loss"].append(prior_loss.item() if prior else 0.0)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # step 2's only (B = 0 before step 1 leaves step 1's A-gradients 0); none for the first text
                # encoder's last layer, whose output the script does not read (it takes the penultimate states)
                if global_step == 1:
                    record |= {f"grad.{global_step + 1}.{name}": p.grad.detach().float().clone()
                               for name, p in named.items() if p.grad is not None}
                params_to_clip = (itertools.chain(unet_lora_parameters, text_lora_parameters_one,
                                                  text_lora_parameters_two)
                                  if case["train_text_encoder"] else unet_lora_parameters)
                grad_norm = accelerator.clip_grad_norm_(params_to_clip, case["max_grad_norm"])
                scalars["grad_norm"].append(float(grad_norm))
                lrs = lr_scheduler.get_last_lr()
                scalars["lr"].append(lrs[0])
                scalars["text_encoder_lr"].append(lrs[1] if len(lrs) > 1 else None)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
    record |= {f"weight.{STEPS}.{name}": p.detach().float().clone() for name, p in named.items()}
    record |= {f"initial.{name}": v for name, v in initial.items()}
    parts = (accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder_one),
             accelerator.unwrap_model(text_encoder_two))
    return record, scalars, parts


def script_saved_keys(parts, train_text_encoder: bool) -> list[str]:
    """The keys of the run's LoRA file as the script's end saves it (convert_state_dict_to_diffusers of peft's
    state dict, StableDiffusionXLPipeline.save_lora_weights)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    unet, te1, te2 = parts
    layers = dict(unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    if train_text_encoder:
        layers |= dict(text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te1)),
                       text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te2)))
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionXLPipeline.save_lora_weights(save_directory=tmp, **layers)
        return sorted(load_file(f"{tmp}/pytorch_lora_weights.safetensors"))


OURS_RUN = ["--rank", "4", "--train_text_encoder", "--resolution", "16", "--train_batch_size", "1",
            "--max_train_steps", "2", "--learning_rate", "1e-2", "--text_encoder_lr", "1e-2", "--seed", "0",
            "--device", "cpu"]
IMAGE_RUN = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, height=32, width=32, seed=7,
                 sampler="euler")


def ours_in_diffusers() -> tuple[dict, dict]:
    """train_dreambooth.py's own output on the tiny SDXL (OURS_RUN: 2 steps at a learning rate that moves B
    away from 0) read by diffusers' StableDiffusionXLPipeline.load_lora_weights: every tensor of the file
    lands in the pipeline's adapters, equal (no missing, no unexpected key: the adapted modules are the file's,
    2 tensors each). Returns the file's tensors and what diffusers computes with it: prompt embeddings, the
    UNet's output on a fixed input, and an image (fused at scale 1, IMAGE_RUN)."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from safetensors.torch import load_file

    import train_dreambooth
    from make_reference_sdxl import run_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "instance").mkdir()
        for i, size in enumerate(((20, 24), (16, 16))):
            g = torch.Generator().manual_seed(10 + i)
            pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(Path(tmp) / "instance" / f"{i}.png")
        code = train_dreambooth.main(["--pretrained_model_name_or_path", str(TINY_SDXL), "--instance_data_dir",
                                      f"{tmp}/instance", "--instance_prompt", PROMPTS[0], "--output_dir",
                                      f"{tmp}/out", *OURS_RUN])
        if code != 0:
            sys.exit(f"train_dreambooth.py on the tiny SDXL: exit status {code}")
        ours = load_file(f"{tmp}/out/pytorch_lora_weights.safetensors")
        pipe = StableDiffusionXLPipeline.from_pretrained(str(TINY_SDXL), add_watermarker=False)
        pipe.load_lora_weights(f"{tmp}/out")
    landed = 0
    for part in ("unet", "text_encoder", "text_encoder_2"):
        prefix = part + "."
        modules = {n: m for n, m in getattr(pipe, part).named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
        file_modules = {k.removeprefix(prefix).rsplit(".", 3)[0] for k in ours if k.startswith(prefix)}
        names = {re.sub(r"^text_model\.", "", n) if part != "unet" else n for n in modules}
        file_names = {re.sub(r"^text_model\.", "", n) for n in file_modules}
        if names != file_names:
            sys.exit(f"{part}: diffusers adapted {len(names)} modules, the file has {len(file_names)}: "
                     f"{sorted(names ^ file_names)[:4]}")
        for name, m in modules.items():
            short = re.sub(r"^text_model\.", "", name) if part != "unet" else name
            key = next(k for k in ours if k.startswith(prefix) and re.sub(r"^text_model\.", "", k.removeprefix(prefix))
                       .startswith(short + ".lora"))
            down, up = key.rsplit(".", 2)[0] + ".down.weight", key.rsplit(".", 2)[0] + ".up.weight"
            adapter = next(iter(m.lora_A))
            if not (torch.equal(m.lora_A[adapter].weight, ours[down]) and torch.equal(m.lora_B[adapter].weight, ours[up])):
                sys.exit(f"{part} {name}: diffusers read another value than the file's {down}")
            landed += 2
    if landed != len(ours):
        sys.exit(f"diffusers' adapters hold {landed} of the file's {len(ours)} tensors")
    g = torch.Generator().manual_seed(2)
    check = {"sample": torch.randn((1, 4, 4, 4), generator=g),
             "time_ids": torch.tensor([[24.0, 40.0, 0.0, 7.0, 16.0, 16.0]])}
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(PROMPTS[0], device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        check |= {"prompt_embeds": states, "pooled_prompt_embeds": pooled}
        check["unet_output"] = pipe.unet(check["sample"], torch.tensor([500]), states, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": check["time_ids"]}).sample
    pipe.fuse_lora(lora_scale=1.0)
    run = IMAGE_RUN
    image = run_pipeline(pipe, ("ours", run["sampler"], run["prompt"], None, 1, run["num_inference_steps"],
                                run["guidance_scale"], run["height"], run["width"], run["seed"], {}))[0]
    check["image"] = torch.from_numpy(np.asarray(image).copy())
    return ours, check


def dataset_reference() -> list[dict]:
    """train_dreambooth_lora_sdxl.py's DreamBoothDataset micro-conditioning of images of DATASET_SIZES at
    --resolution 16 with --center_crop: the size before its Resize, and its crop's top-left, computed with its
    torchvision transforms as it computes them (sizes whose resize is exact: torchvision truncates the longer
    side, ours rounds it, docs/sdxl.md)."""
    from PIL import Image
    from torchvision import transforms
    out = []
    for h, w in DATASET_SIZES:
        image = Image.new("RGB", (w, h))
        original_size = (image.height, image.width)
        image = transforms.Resize(RESOLUTION, interpolation=transforms.InterpolationMode.LANCZOS)(image)
        y1 = max(0, int(round((image.height - RESOLUTION) / 2.0)))
        x1 = max(0, int(round((image.width - RESOLUTION) / 2.0)))
        image = transforms.CenterCrop(RESOLUTION)(image)
        out.append({"size": [h, w], "original_size": list(original_size), "crop_top_left": [y1, x1]})
    return out


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs()
    cases = {}
    for name, case in CASES.items():
        tensors, scalars, parts = lora_sdxl_reference(case, inputs)
        for k in range(MICRO_BATCHES):
            key = f"time_ids.{k}"
            if key in tensors:
                inputs.setdefault(f"{k}.time_ids.{name}", tensors.pop(key))
        if name == "a_prior_text_encoders":
            saved_keys = script_saved_keys(parts, case["train_text_encoder"])
        write_safetensors(OUT / f"lora_{name}.safetensors", {k: v.contiguous() for k, v in sorted(tensors.items())},
                          {"format": "pt"})
        cases[name] = dict(script="diffusers examples/dreambooth/train_dreambooth_lora_sdxl.py", flags=case,
                           steps=STEPS, **scalars)
        print(f"{name}: loss {[round(x, 6) for x in scalars['loss']]}, grad norm "
              f"{[round(x, 6) for x in scalars['grad_norm']]}")
    write_safetensors(OUT / "inputs.safetensors", {k: v.contiguous() for k, v in sorted(inputs.items())},
                      {"format": "pt"})
    (OUT / "dataset.json").write_text(json.dumps(dataset_reference(), indent=1) + "\n")
    ours, check = ours_in_diffusers()
    write_safetensors(OUT / "ours_lora.safetensors", dict(sorted(ours.items())), {"format": "pt"})
    write_safetensors(OUT / "ours_in_diffusers.safetensors", {k: v.contiguous() for k, v in sorted(check.items())},
                      {"format": "pt"})
    reference = dict(versions=versions(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                     bf16_native=native_on_cpu(torch.bfloat16), prompts=list(PROMPTS), steps=STEPS,
                     resolution=RESOLUTION, model="tests/fixtures/sdxl/tiny_diffusers", cases=cases,
                     script_saved_keys=saved_keys, ours_run=OURS_RUN, image_run=IMAGE_RUN,
                     ours_in_diffusers=f"load_lora_weights read all {len(ours)} tensors of ours_lora.safetensors")
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/fixtures/training/sdxl: {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
