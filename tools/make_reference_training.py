"""Dev-only: reference training steps, for tests/test_training_parity.py.

    .venv-dev/bin/python tools/make_reference_training.py

Runs the reference training loops for 3 optimizer steps on fixed batches and fixed random draws, and
records what each step did. Writes under tests/fixtures/training/:
- tiny_sd/: a Stable Diffusion v1-family folder smaller than tests/fixtures/sd/tiny_diffusers (UNet
  channels (4, 8), one layer per block; a one-layer text encoder of width 8; a two-level VAE), every
  weight perturbed; its tokenizer is tiny_diffusers'. At 23k trainable parameters one gradient or one
  set of weights is 92 kB (tiny_diffusers' 340k would be 1.4 MB each, times every case).
- inputs.safetensors: six micro-batches of 2 instance + 2 class images (16x16 uint8, which the scripts'
  transforms end as torchvision's ToTensor + Normalize([0.5], [0.5])), their prompts' token ids, and the
  draws of each (the VAE posterior sample's noise, the noise, the offset noise, the timesteps).
- dreambooth_<case>.safetensors: diffusers' examples/dreambooth/train_dreambooth.py (train_dreambooth_lora.py
  for the LoRA case) loop reproduced step for step (`dreambooth_reference`), through accelerate as the
  script runs it: per step the loss and its instance and prior parts (per micro-batch), the learning rate
  and the gradient norm before clipping; every trainable parameter's gradient at step 1 (before
  clipping, after accumulation) under the checkpoint's names ("unet.<key>", "text_encoder.<key>" as in the
  folder's files; LoRA: peft's keys without the adapter name); every trainable weight after step 3 (LoRA:
  also the initial LoRA weights, and the gradients of every step, since B = 0 makes step 1's A-gradients 0).
- trainer_vit.safetensors: transformers' Trainer fine-tuning tests/fixtures/vit/hf_classifier for 3 steps
  (its default fused AdamW, its weight-decay grouping, linear warmup, max_grad_norm 1.0), the batches in
  the dataset's order: per step the loss, lr and gradient norm, step 1's gradients and the weights after
  step 3, under transformers' names.
- reference.json: the cases, the library versions, and the CPU the numbers were made on (bf16 kernels
  differ between CPU kinds: torch.backends.cpu.get_cpu_capability() and whether oneDNN has native bf16).

Step 2 and 3's gradients are summarised by their norm only, and the weights kept are step 3's, to keep
the fixtures small (each full set is 92 kB); a difference in a later step shows in step 3's weights.
Regenerating is byte-identical: one thread, fixed seeds, sorted keys.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.precision import native_on_cpu  # noqa: E402
from common.state_dict import write_safetensors  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "training"
TINY_SD = OUT / "tiny_sd"
SD_FIXTURE = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
VIT_FIXTURE = ROOT / "tests" / "fixtures" / "vit" / "hf_classifier"

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=8, attention_head_dim=2, norm_num_groups=2)
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                latent_channels=4, norm_num_groups=2, sample_size=16)
TINY_CLIP = dict(hidden_size=8, intermediate_size=11, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2)
RESOLUTION, BATCH = 16, 2                         # 2 instance + 2 class images per micro-batch
PROMPTS = ("a photo of sks dog", "a photo of dog")  # instance, class
STEPS = 3

# train_dreambooth.py's flags for each case (those not named are the script's defaults: AdamW betas
# 0.9/0.999, weight decay 1e-2, eps 1e-8, a constant learning rate, clipping at 1.0, prior loss weight 1).
BASE = dict(train_text_encoder=True, with_prior_preservation=True, prior_loss_weight=1.0, learning_rate=5e-6,
            max_grad_norm=1.0, gradient_accumulation_steps=1, mixed_precision="no", snr_gamma=None,
            offset_noise=False, prediction_type="epsilon", rank=None)
CASES = {
    "a_full_prior": dict(BASE),
    "b_snr_gamma": dict(BASE, snr_gamma=5.0),
    "c_offset_noise": dict(BASE, offset_noise=True),
    "d_v_prediction": dict(BASE, prediction_type="v_prediction"),
    "d_v_prediction_snr_gamma": dict(BASE, prediction_type="v_prediction", snr_gamma=5.0),
    "e_lora": dict(BASE, rank=4, learning_rate=5e-4),
    "f_accumulation_clipping": dict(BASE, gradient_accumulation_steps=2, max_grad_norm=0.05),
    "g_bf16": dict(BASE, mixed_precision="bf16"),
}


# ---------------------------------------------------------------- the tiny model and the inputs
def perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def build_tiny_sd() -> None:
    """tiny_sd/ in the public layout: each part saved by its library, the text encoder's file with the
    `text_model.` prefix and position_ids of the public SD v1 folders (transformers 4's layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vocab = len(json.loads((SD_FIXTURE / "tokenizer" / "vocab.json").read_text()))
    unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, **TINY_CLIP))
    for m in (unet, vae, text_encoder):
        perturb(m, gen)
    shutil.rmtree(TINY_SD, ignore_errors=True)
    unet.save_pretrained(TINY_SD / "unet")
    vae.save_pretrained(TINY_SD / "vae")
    text_encoder.save_pretrained(TINY_SD / "text_encoder")
    path = TINY_SD / "text_encoder" / "model.safetensors"
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in load_file(str(path)).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(TINY_CLIP["max_position_embeddings"])[None]
    save_file(dict(sorted(sd.items())), str(path), metadata={"format": "pt"})
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(SD_FIXTURE / part, TINY_SD / part)
    shutil.copy(SD_FIXTURE / "model_index.json", TINY_SD / "model_index.json")


def make_inputs() -> dict[str, torch.Tensor]:
    """Six micro-batches: pixels (uint8 values through ToTensor + Normalize([0.5], [0.5]), as the script's
    transforms), token ids as the script's tokenize_prompt (slow CLIPTokenizer, max_length padding), and
    the draws, float32 standard normals and int64 timesteps, from one seeded generator; the first
    instance and the first class image of each micro-batch at a timestep below 100 (SNR > 5 there, so
    --snr_gamma 5 changes their weight)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_SD), subfolder="tokenizer", use_fast=False)
    ids = torch.cat([tokenizer(p, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                               return_tensors="pt").input_ids for p in PROMPTS for _ in range(BATCH)])
    g = torch.Generator().manual_seed(0)
    out = {"input_ids": ids}
    n, latent = 2 * BATCH, (4, RESOLUTION // 2, RESOLUTION // 2)
    for k in range(2 * STEPS):
        out[f"{k}.pixels"] = torch.randint(0, 256, (n, 3, RESOLUTION, RESOLUTION), generator=g, dtype=torch.uint8)
        out[f"{k}.posterior"] = torch.randn((n, *latent), generator=g)
        out[f"{k}.noise"] = torch.randn((n, *latent), generator=g)
        out[f"{k}.offset"] = torch.randn((n, latent[0], 1, 1), generator=g)
        t = torch.randint(0, 1000, (n,), generator=g)
        t[::BATCH] = torch.randint(0, 100, (2,), generator=g)   # an instance and a class image where SNR > 5
        out[f"{k}.timesteps"] = t
    return out


def normalize(uint8: torch.Tensor) -> torch.Tensor:
    """torchvision's ToTensor then Normalize([0.5], [0.5]), as the scripts' image transforms end."""
    return (uint8.float() / 255 - 0.5) / 0.5


# ---------------------------------------------------------------- diffusers' DreamBooth loops
def text_key(name: str) -> str:
    """The text encoder's parameter name as the public file spells it (transformers >= 5.6 dropped the
    `text_model.` level, which the files, and transformers 4, have)."""
    return "text_model." + name.removeprefix("text_model.")


def trainable(unet, text_encoder) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer moves, under the checkpoint's names ("unet.<key>", "text_encoder.<key>";
    peft's LoRA keys without the adapter name, as diffusers saves them)."""
    out = {}
    for part, model, name_of in (("unet", unet, lambda n: n), ("text_encoder", text_encoder, text_key)):
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[f"{part}.{name_of(name.replace('.default.', '.'))}"] = p
    return out


def dreambooth_reference(case: dict, inputs: dict) -> tuple[dict, dict]:
    """diffusers' examples/dreambooth/train_dreambooth.py (with `rank`: train_dreambooth_lora.py), its
    training loop as the script runs it, for STEPS optimizer steps on the given batches and draws. The
    script's lines are kept in their order; only where it draws random numbers the recorded draws are
    used, and the batches come from `inputs` instead of its DataLoader:
    - latent_dist.sample() is latent_dist.mean + latent_dist.std * draw (what sample() computes, its
      randn_tensor in the latents' dtype);
    - torch.randn_like(model_input) (+ 0.1 * torch.randn(B, C, 1, 1) with --offset_noise) and
      torch.randint(0, T, (bsz,)) are the recorded noise, offset and timesteps, in the latents' dtype.
    One departure, for --snr_gamma with prior preservation: train_dreambooth.py computes the weights from
    all 2B timesteps and multiplies them into the B instance losses, which fails on a shape mismatch for
    --train_batch_size > 1 (diffusers issue #5791; at batch 1 it broadcasts, weighting the instance loss
    by the mean of its and the class image's weights). Here the weights come from the instance images'
    timesteps, as diffusers fixed it in train_dreambooth_lora_sdxl.py (PR #6356): the instance loss
    min-SNR weighted, the prior loss plain MSE."""
    import itertools

    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel

    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)    # one script run per case: a fresh accelerate
    GradientState._reset_state()
    folder, lora = str(TINY_SD), case["rank"] is not None
    accumulation, prior = case["gradient_accumulation_steps"], case["with_prior_preservation"]
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision=case["mixed_precision"],
                              cpu=True)
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler",
                                                    prediction_type=case["prediction_type"])
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(case["mixed_precision"], torch.float32)
    vae.requires_grad_(False)
    if lora:   # train_dreambooth_lora.py: every base weight frozen, in weight_dtype; peft adapters train
        from peft import LoraConfig
        text_encoder.requires_grad_(False)
        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        vae.to(accelerator.device, dtype=weight_dtype)
        text_encoder.to(accelerator.device, dtype=weight_dtype)
        torch.manual_seed(1)                               # peft's gaussian init of A draws from here
        unet.add_adapter(LoraConfig(r=case["rank"], lora_alpha=case["rank"], init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj",
                                                    "add_v_proj"]))
        if case["train_text_encoder"]:
            # text_encoder.add_adapter(config) in the script; transformers 5.24's add_adapter refuses peft
            # 0.21.2 (it asks for >= 0.22, not published), so the peft call it makes, as it makes it
            from peft import inject_adapter_in_model
            inject_adapter_in_model(LoraConfig(r=case["rank"], lora_alpha=case["rank"], init_lora_weights="gaussian",
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                    text_encoder, adapter_name="default")
        params_to_optimize = list(filter(lambda p: p.requires_grad, unet.parameters()))
        if case["train_text_encoder"]:
            params_to_optimize += list(filter(lambda p: p.requires_grad, text_encoder.parameters()))
    else:
        if not case["train_text_encoder"]:
            text_encoder.requires_grad_(False)
        params_to_optimize = (itertools.chain(unet.parameters(), text_encoder.parameters())
                              if case["train_text_encoder"] else unet.parameters())
    named = trainable(unet, text_encoder)
    initial = {k: v.detach().clone() for k, v in named.items()} if lora else {}
    optimizer = torch.optim.AdamW(params_to_optimize, lr=case["learning_rate"], betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500 * accelerator.num_processes,
                                 num_training_steps=STEPS * accelerator.num_processes)
    if case["train_text_encoder"]:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer,
                                                                          lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if not lora:   # train_dreambooth.py: the frozen parts in weight_dtype after prepare
        vae.to(accelerator.device, dtype=weight_dtype)
        if not case["train_text_encoder"]:
            text_encoder.to(accelerator.device, dtype=weight_dtype)

    record, scalars, micro = {}, {"loss": [], "instance_loss": [], "prior_loss": [], "lr": [], "grad_norm": []}, 0
    unet.train()
    if case["train_text_encoder"]:
        text_encoder.train()
    global_step = 0
    while global_step < STEPS:
        k = micro
        micro += 1
        with accelerator.accumulate(unet):
            pixel_values = normalize(inputs[f"{k}.pixels"]).to(dtype=weight_dtype)
            latent_dist = vae.encode(pixel_values).latent_dist
            model_input = latent_dist.mean + latent_dist.std * inputs[f"{k}.posterior"].to(latent_dist.mean.dtype)
            model_input = model_input * vae.config.scaling_factor
            if case["offset_noise"]:
                noise = (inputs[f"{k}.noise"].to(model_input.dtype)
                         + 0.1 * inputs[f"{k}.offset"].to(model_input.dtype))
            else:
                noise = inputs[f"{k}.noise"].to(model_input.dtype)
            timesteps = inputs[f"{k}.timesteps"].long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            encoder_hidden_states = text_encoder(inputs["input_ids"], attention_mask=None, return_dict=False)[0]
            model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, class_labels=None).sample
            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            elif noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(model_input, noise, timesteps)
            if prior:
                model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
            if case["snr_gamma"] is None or lora:      # train_dreambooth_lora.py has no --snr_gamma
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            else:
                snr_timesteps = torch.chunk(timesteps, 2, dim=0)[0] if prior else timesteps   # see above
                snr = compute_snr(noise_scheduler, snr_timesteps)
                base_weight = (torch.stack([snr, case["snr_gamma"] * torch.ones_like(snr_timesteps)], dim=1)
                               .min(dim=1)[0] / snr)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    mse_loss_weights = base_weight + 1     # the script: "floored to an SNR weight of one"
                else:
                    mse_loss_weights = base_weight
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                loss = loss.mean()
            instance_loss = loss.detach().clone()
            if prior:
                loss = loss + case["prior_loss_weight"] * prior_loss
            scalars["loss"].append(loss.item())
            scalars["instance_loss"].append(instance_loss.item())
            scalars["prior_loss"].append(prior_loss.item() if prior else 0.0)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if global_step == 0 or lora:   # before clipping: the gradient the loss gave
                    record |= {f"grad.{global_step + 1}.{name}": p.grad.detach().float().clone()
                               for name, p in named.items()}
                params_to_clip = params_to_optimize if lora else (
                    itertools.chain(unet.parameters(), text_encoder.parameters())
                    if case["train_text_encoder"] else unet.parameters())
                grad_norm = accelerator.clip_grad_norm_(params_to_clip, case["max_grad_norm"])
                scalars["grad_norm"].append(float(grad_norm))
                scalars["lr"].append(lr_scheduler.get_last_lr()[0])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=False)
        if accelerator.sync_gradients:
            global_step += 1
    record |= {f"weight.{STEPS}.{name}": p.detach().float().clone() for name, p in named.items()}
    record |= {f"initial.{name}": v for name, v in initial.items()}
    return record, scalars


# ---------------------------------------------------------------- transformers' Trainer
TRAINER = dict(learning_rate=1e-3, weight_decay=0.05, warmup_steps=2, lr_scheduler_type="linear", max_grad_norm=1.0,
               per_device_train_batch_size=4, max_steps=STEPS, seed=0)


def trainer_reference() -> tuple[dict, dict, dict]:
    """transformers' Trainer fine-tuning the tiny ViT classifier, as a Trainer user runs it (its defaults:
    the fused torch AdamW, betas 0.9/0.999, eps 1e-8, weight decay on all but `get_decay_parameter_names`'
    exclusions: biases and LayerNorm weights), for STEPS steps. The one change: the batches come in the
    dataset's order (a SequentialSampler), so that the fixture can record them. Gradients are read after
    `training_step`'s backward (before clipping), weights after each optimizer step."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification.from_pretrained(str(VIT_FIXTURE))
    config = model.config
    if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
        sys.exit("the parity ViT must have dropout 0 (ours has no dropout)")
    g = torch.Generator().manual_seed(1)
    n = TRAINER["per_device_train_batch_size"] * STEPS
    images = torch.randint(0, 256, (n, 3, config.image_size, config.image_size), generator=g, dtype=torch.uint8)
    pixels = normalize(images)          # as the fixture's ViTImageProcessor: rescale 1/255, mean = std = 0.5
    labels = torch.randint(0, config.num_labels, (n,), generator=g)
    dataset = [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(n)]
    record, scalars = {}, {"loss": [], "lr": [], "grad_norm": []}

    class Recording(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            scalars["loss"].append(loss.item())
            if self.state.global_step == 0:
                record.update({f"grad.1.{name}": p.grad.detach().clone() for name, p in model.named_parameters()})
            return loss

    class Scalars(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            scalars["lr"].append(trainer.lr_scheduler.get_last_lr()[0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                scalars["grad_norm"].append(float(logs["grad_norm"]))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], save_strategy="no", logging_strategy="steps",
                                 logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                                 remove_unused_columns=False, **TRAINER)
        trainer = Recording(model=model, args=args, train_dataset=dataset, callbacks=[Scalars()])
        trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    decay = set(trainer.get_decay_parameter_names(model))
    runtime = dict(model.named_parameters())
    record = checkpoint_names(model, {name: record[f"grad.1.{name}"] for name in runtime}, prefix="grad.1.")
    record |= checkpoint_names(model, {name: p.detach() for name, p in runtime.items()}, prefix=f"weight.{STEPS}.")
    marks = checkpoint_names(model, {name: torch.full_like(p, float(name in decay)) for name, p in runtime.items()})
    record |= {"images": images, "labels": labels}
    info = dict(TRAINER, optim=str(args.optim), optimizer=type(optimizer).__name__,
                fused=bool(optimizer.defaults.get("fused")),
                decay_parameters=sorted(k for k, v in marks.items() if bool(v.flatten()[0])))
    return record, scalars, info


def checkpoint_names(model, values: dict[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """`values` (one tensor per parameter, by the model's runtime names) under the checkpoint's names:
    transformers 5 renames some modules when it loads (a ViT's `encoder.layer.0.attention.attention.key`
    is `layers.0.attention.k_proj`) and names them back when it saves, so the values are saved as the
    model's weights and read back."""
    import copy

    from safetensors.torch import load_file
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(values[name])
    with tempfile.TemporaryDirectory() as tmp:
        clone.save_pretrained(tmp)
        return {prefix + k: v for k, v in load_file(f"{tmp}/model.safetensors").items()}


# ---------------------------------------------------------------- main
def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__}


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    build_tiny_sd()
    inputs = make_inputs()
    write_safetensors(OUT / "inputs.safetensors", {k: v.contiguous() for k, v in inputs.items()}, {"format": "pt"})
    cases = {}
    for name, case in CASES.items():
        tensors, scalars = dreambooth_reference(case, inputs)
        write_safetensors(OUT / f"dreambooth_{name}.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                          {"format": "pt"})
        script = "train_dreambooth_lora.py" if case["rank"] else "train_dreambooth.py"
        cases[name] = dict(script=f"diffusers examples/dreambooth/{script}", flags=case, steps=STEPS, **scalars)
        print(f"{name}: loss {[round(x, 6) for x in scalars['loss']]}, grad norm "
              f"{[round(x, 6) for x in scalars['grad_norm']]}")
    tensors, scalars, info = trainer_reference()
    write_safetensors(OUT / "trainer_vit.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                      {"format": "pt"})
    print(f"trainer: loss {scalars['loss']}, lr {scalars['lr']}, grad norm {scalars['grad_norm']}")
    reference = dict(versions=versions(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                     bf16_native=native_on_cpu(torch.bfloat16), prompts=list(PROMPTS), batch_size=BATCH, steps=STEPS,
                     resolution=RESOLUTION, dreambooth=cases,
                     trainer=dict(info, model="tests/fixtures/vit/hf_classifier", steps=STEPS, **scalars))
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/fixtures/training: {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
