"""DreamBooth-LoRA on SDXL proven step for step: train_dreambooth.py's loop body against diffusers'
train_dreambooth_lora_sdxl.py on the same batches, draws and micro-conditioning, and its output file read by
diffusers' StableDiffusionXLPipeline (tests/fixtures/training/sdxl, made by tools/make_reference_training_sdxl.py
on the tiny SDXL of tools/make_reference_sdxl.py).

The measures and bounds are tests/test_training_parity.py's fp32 ones: every loss and its parts, every step's
gradient norm and learning rates (the UNet's and the text encoders' own), step 2's gradient of every LoRA
parameter, and every LoRA weight after step 3."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth
from common.precision import MIXED_PRECISION, autocast
from common.state_dict import read_safetensors
from common.training import Distributed, adamw, finish_step, grad_scaler, learning_rate
from diffusion import lora
from diffusion.checkpoints.lora_files import theirs
from diffusion.pipeline import micro_conditioning
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from dreambooth.data import image_size, load_image
from dreambooth.steps import (Batch, Draws, added_conditioning, denoising_loss, denoising_prediction, encode,
                              load_models, make_batch, parameter_groups, trainable_parameters)
from test_training_parity import FP32_GRADIENT, gradient_errors, noise_only, relative, tensors_of, weight_error

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "training" / "sdxl"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
MODEL = ROOT / REFERENCE["model"]
CPU = torch.device("cpu")
LOSS_NAMES = train_dreambooth.LOSS_NAMES
MAX_DIFF = 2                                     # images: within 2/255

pytestmark = pytest.mark.usefixtures("one_thread")


def made_with() -> str:
    v = REFERENCE["versions"]
    return (f"(fixture made with torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
            f"peft {v['peft']} on a {REFERENCE['cpu_capability']} CPU; here torch {torch.__version__})")


@pytest.fixture(scope="module")
def inputs() -> dict:
    return read_safetensors(FIXTURES / "inputs.safetensors")


def parse_flags(flags: dict):
    """train_dreambooth.py's arguments for the case's flags; the hyperparameters the case leaves at the script's
    defaults come from our SDXL defaults, and must be the script's."""
    argv = ["--rank", str(flags["rank"]), "--train_batch_size", str(flags["train_batch_size"]),
            "--gradient_accumulation_steps", str(flags["gradient_accumulation_steps"]),
            "--mixed_precision", flags["mixed_precision"], "--resolution", str(REFERENCE["resolution"])]
    argv += ["--train_text_encoder"] * flags["train_text_encoder"]
    argv += ["--with_prior_preservation"] * flags["with_prior_preservation"]
    args = train_dreambooth.build_parser().parse_args(argv)
    train_dreambooth.family_defaults(args, sdxl=True)
    for name in ("learning_rate", "text_encoder_lr", "adam_weight_decay", "adam_weight_decay_text_encoder",
                 "max_grad_norm", "prior_loss_weight"):
        assert getattr(args, name) == flags[name], (name, getattr(args, name), flags[name])
    return args


def lora_names(models) -> dict[str, torch.nn.Parameter]:
    """Our LoRA parameters under peft's saved names, as the fixture records the script's."""
    return {f"{part}.{theirs(part, name)}.{ab}.weight": getattr(layer, ab).weight
            for part in ("unet", "text_encoder", "text_encoder_2")
            for name, layer in lora.lora_layers(getattr(models, part)).items() for ab in ("lora_A", "lora_B")}


def script_time_ids(inputs: dict, k: int, prior: bool) -> torch.Tensor:
    """Micro-batch k's micro-conditioning by `micro_conditioning` from the recorded sizes and crops, as the
    script's batch holds them (its class row repeats its instance example's size and crop)."""
    sizes, crops = inputs[f"{k}.original_sizes"].tolist(), inputs[f"{k}.crop_top_lefts"].tolist()
    if prior:
        sizes, crops = sizes[:1] * 2, crops[:1] * 2
    r = REFERENCE["resolution"]
    return torch.stack([micro_conditioning(r, r, original_size=s, crops_coords_top_left=c) for s, c in zip(sizes, crops)])


def run_sdxl(name: str, inputs: dict, initial: dict) -> dict:
    """train_dreambooth.py main's loop body on SDXL for the fixture's steps, line for line but for the batch (the
    fixture's pixels) and what the script draws or computes per batch (the draws and the time ids, given)."""
    flags = REFERENCE["cases"][name]["flags"]
    args = parse_flags(flags)
    precision, B, prior = MIXED_PRECISION[args.mixed_precision], args.train_batch_size, args.with_prior_preservation
    accumulation, steps = args.gradient_accumulation_steps, REFERENCE["steps"]
    models, _ = load_models(str(MODEL), config_dir=None, resolution=args.resolution, device=CPU, precision=precision,
                            rank=args.rank, train_text_encoder=args.train_text_encoder)
    assert models.is_sdxl
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(models.scheduler_config))
    params = trainable_parameters(models, train_text_encoder=args.train_text_encoder, gradient_checkpointing=False,
                                  rank=args.rank, precision=precision)
    named = lora_names(models)
    with torch.no_grad():                       # the script's peft init (A random, B = 0), for ours
        for k, p in named.items():
            p.copy_(initial[f"initial.{k}"])
    out = {"loss": [], "instance_loss": [], "prior_loss": [], "lr": [], "text_encoder_lr": [], "grad_norm": [],
           "tensors": {f"weight.0.{k}": p.detach().clone() for k, p in named.items()}}
    groups = parameter_groups(models, params, lr=args.learning_rate, weight_decay=args.adam_weight_decay,
                              text_encoder_lr=args.text_encoder_lr,
                              text_encoder_weight_decay=args.adam_weight_decay_text_encoder)
    optimizer = adamw(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scaler = grad_scaler(CPU, precision)
    prompts = [REFERENCE["prompts"][0]] * B + ([REFERENCE["prompts"][1]] * B if prior else [])
    rows = slice(0, 2 if prior else 1)
    for i, tokenizer in enumerate((models.tokenizer, models.tokenizer_2)):   # the script's tokens, ours
        assert torch.equal(tokenizer(REFERENCE["prompts"][rows], padding=True, max_length=77),
                           inputs[f"input_ids_{i + 1}"][rows]), made_with()
    for step in range(steps):
        sums = torch.zeros(2 + prior)
        for micro in range(accumulation):
            k = step * accumulation + micro
            pixels = (inputs[f"{k}.pixels"].float() / 255 - 0.5) / 0.5        # ToTensor, Normalize([0.5], [0.5])
            time_ids = script_time_ids(inputs, k, prior)
            assert torch.equal(time_ids, inputs[f"{k}.time_ids.{name}"]), made_with()   # the script's add_time_ids
            batch = Batch(pixels=pixels, generators=[], crops=[], time_ids=time_ids)
            draws = Draws(posterior=inputs[f"{k}.posterior"], noise=inputs[f"{k}.noise"],
                          timesteps=inputs[f"{k}.timesteps"])
            # -- the loop's micro-batch, as in train_dreambooth.py's main --
            with torch.set_grad_enabled(args.train_text_encoder), autocast(precision, CPU):
                states, pooled = encode(models.text_encoders, models, prompts, CPU)
            pred, target, t = denoising_prediction(models.unet, models.vae, schedule, batch, states,
                                                   precision=precision, offset_noise=False, draws=draws,
                                                   vae_precision="fp32", added=added_conditioning(pooled, batch))
            instance_loss = denoising_loss(pred[:B], target[:B], t[:B])
            prior_loss = denoising_loss(pred[B:], target[B:], t[B:]) if prior else 0.0
            loss = instance_loss + args.prior_loss_weight * prior_loss
            scaler.scale(loss / accumulation).backward()
            sums += torch.stack([loss, instance_loss, prior_loss][:2 + prior]).detach()
            for key, value in zip(LOSS_NAMES, (loss, instance_loss, prior_loss)):
                out[key].append(float(value.detach()) if torch.is_tensor(value) else value)
        if step == 1:
            out["tensors"] |= {f"grad.2.{k}": p.grad.detach().clone() for k, p in named.items() if p.grad is not None}
        lr = learning_rate(step, total=steps, peak=args.learning_rate, schedule=args.lr_scheduler,
                           warmup=args.lr_warmup_steps)
        record = finish_step(sums, names=LOSS_NAMES, micro_batches=accumulation, step=step, skipped=0, lr=lr,
                             dist=Distributed(), optimizer=optimizer, scaler=scaler, params=params,
                             max_grad_norm=args.max_grad_norm, skip_nonfinite=False)
        out["lr"].append(record["lr"])
        out["text_encoder_lr"].append(optimizer.param_groups[1]["lr"] if len(optimizer.param_groups) > 1 else None)
        out["grad_norm"].append(record["grad_norm"])
    out["tensors"] |= {f"weight.{steps}.{k}": p.detach().clone() for k, p in named.items()}
    return out


@pytest.mark.parametrize("name", sorted(REFERENCE["cases"]))
def test_sdxl_lora_step_equals_diffusers_script(name, inputs):
    """fp32, the script's defaults: the loss and its parts within 1e-6 relative, the gradient norms within 1e-5,
    the learning rates (the UNet's 1e-4, the text encoders' 5e-6) exact, every gradient at step 2 within 1e-5 of
    its tensor's largest (+ 1e-6 of its model part's largest), every LoRA weight after 3 steps within 1e-6."""
    reference = REFERENCE["cases"][name]
    tensors = read_safetensors(FIXTURES / f"lora_{name}.safetensors")
    ours = run_sdxl(name, inputs, tensors)
    for key in LOSS_NAMES:
        assert relative(ours[key], reference[key]) <= 1e-6, (name, key, ours[key], reference[key], made_with())
    assert relative(ours["grad_norm"], reference["grad_norm"]) <= 1e-5, (name, ours["grad_norm"], made_with())
    assert ours["lr"] == pytest.approx(reference["lr"], rel=1e-12), made_with()
    if reference["flags"]["train_text_encoder"]:
        assert ours["text_encoder_lr"] == pytest.approx(reference["text_encoder_lr"], rel=1e-12), made_with()
    grads = tensors_of("grad", tensors)
    worst, where = gradient_errors(tensors_of("grad", ours["tensors"]), grads, **FP32_GRADIENT)   # the same keys too
    assert worst <= 1, (name, where, worst, made_with())
    weights = tensors_of(f"weight.{REFERENCE['steps']}", tensors)
    worst, where = weight_error({k: ours["tensors"][k] for k in weights}, weights,
                                noise=noise_only(tensors, FP32_GRADIENT["floor"]), lr_sum=sum(reference["lr"]))
    assert worst <= 1e-6, (name, where, worst, made_with())


def test_crop_micro_conditioning_equals_the_scripts_dataset(tmp_path):
    """Each instance crop's time ids: its image's size before resizing, the centre crop's top-left in the resized
    image, the target --resolution square, as train_dreambooth_lora_sdxl.py's DreamBoothDataset computes them
    (through its torchvision transforms) for images of several shapes."""
    r = REFERENCE["resolution"]
    for entry in json.loads((FIXTURES / "dataset.json").read_text()):
        h, w = entry["size"]
        path = tmp_path / f"{h}x{w}.png"
        Image.new("RGB", (w, h), (90, 20, 200)).save(path)
        batch = make_batch(range(1), order=torch.zeros(1, dtype=torch.long), epoch=0, seed=0,
                           instance_images=[load_image(path, r)], class_images=[], resolution=r, center_crop=True,
                           original_sizes={"instance": [image_size(path)]})
        expected = torch.tensor([[*entry["original_size"], *entry["crop_top_left"], r, r]], dtype=torch.float32)
        assert torch.equal(batch.time_ids, expected), (entry, batch.time_ids)


def instance_folder(tmp_path: Path) -> Path:
    """The tool's two instance images (ours_in_diffusers)."""
    folder = tmp_path / "instance"
    folder.mkdir()
    for i, size in enumerate(((20, 24), (16, 16))):
        g = torch.Generator().manual_seed(10 + i)
        Image.fromarray(torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    return folder


def test_train_dreambooth_writes_the_lora_file_diffusers_reads(tmp_path, capsys):
    """train_dreambooth.py on the tiny SDXL (the tool's run) writes pytorch_lora_weights.safetensors with the keys
    the script's save_lora_weights writes (unet., text_encoder., text_encoder_2.; the text encoders' under
    transformers 4's `text_model.` level, which diffusers reads either way) and the tensors of the file that
    diffusers' load_lora_weights read whole when the fixture was made."""
    out = tmp_path / "out"
    code = train_dreambooth.main(["--pretrained_model_name_or_path", str(MODEL), "--instance_data_dir",
                                  str(instance_folder(tmp_path)), "--instance_prompt", REFERENCE["prompts"][0],
                                  "--output_dir", str(out), *REFERENCE["ours_run"]])
    assert code == 0, capsys.readouterr().err
    ours = read_safetensors(out / "pytorch_lora_weights.safetensors")
    recorded = read_safetensors(FIXTURES / "ours_lora.safetensors")
    assert ours.keys() == recorded.keys()
    # AdamW moves every weight by about lr a step whatever its gradient's size, so another torch's rounding of a
    # small gradient shows as a share of the steps (measured: 2.6e-5 after 2 steps of 1e-2, torch 2.13 vs 2.14)
    for k, v in recorded.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0.01 * 2 * 1e-2, msg=k)
    script = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")
               .replace("text_encoder_2.encoder.", "text_encoder_2.text_model.encoder.") for k in REFERENCE["script_saved_keys"]}
    assert set(ours) == script, sorted(set(ours) ^ script)[:5]


def test_sample_py_with_the_trained_lora_gives_diffusers_outputs(tmp_path, capsys):
    """The trained file (ours_lora.safetensors) in our pipeline: the prompt embeddings and the UNet's output that
    StableDiffusionXLPipeline computes with it loaded (within 1e-4, as tests/test_sdxl.py's LoRA files), and
    sample.py --lora's image within 2/255 of the pipeline's after fuse_lora."""
    import sample
    from diffusion.checkpoints.load import load_stable_diffusion
    from diffusion.checkpoints.lora_files import load_lora_files
    from diffusion.pipeline import encode_prompts_sdxl
    check = read_safetensors(FIXTURES / "ours_in_diffusers.safetensors")
    models = load_stable_diffusion(MODEL)
    changed, skipped = load_lora_files(models, [(str(FIXTURES / "ours_lora.safetensors"), 1.0)])
    assert changed == {"unet", "text_encoder", "text_encoder_2"} and not skipped
    with torch.no_grad():
        states, pooled = encode_prompts_sdxl(models.text_encoders, (models.tokenizer, models.tokenizer_2),
                                             [REFERENCE["prompts"][0]], CPU)
        out = models.unet(check["sample"], torch.tensor([500]), check["prompt_embeds"],
                          text_embeds=check["pooled_prompt_embeds"], time_ids=check["time_ids"])
    assert (states - check["prompt_embeds"]).abs().max() <= 1e-4, made_with()
    assert (pooled - check["pooled_prompt_embeds"]).abs().max() <= 1e-4, made_with()
    assert (out - check["unet_output"]).abs().max() <= 1e-4, made_with()
    run = REFERENCE["image_run"]
    written = sample.main(["--ckpt", str(MODEL), "--outdir", str(tmp_path), "--prompt", run["prompt"], "--n_samples",
                           "1", "--ddim_steps", str(run["num_inference_steps"]), "--scale", str(run["guidance_scale"]),
                           "--H", str(run["height"]), "--W", str(run["width"]), "--seed", str(run["seed"]),
                           "--sampler", run["sampler"], "--device", "cpu",
                           "--lora", str(FIXTURES / "ours_lora.safetensors")])
    ours = np.asarray(Image.open(written[0])).astype(int)
    assert np.abs(ours - check["image"].numpy().astype(int)).max() <= MAX_DIFF, made_with()


def test_full_fine_tuning_refusal_counts_sdxl_base_parameters():
    """The refusal's memory comes from the UNet's parameter count: SDXL base's preset counts the 2,567,463,684
    weights of the published unet/diffusion_pytorch_model.safetensors (tests/manifests), 16 bytes each."""
    import math

    from diffusion.models.unet import UNetConfig
    from dreambooth.memory import sdxl_full_fine_tuning_refusal
    manifest = json.loads((ROOT / "tests" / "manifests" / "sdxl_base_diffusers.json").read_text())["files"]
    entries = manifest["unet/diffusion_pytorch_model.safetensors"]
    count = sum(math.prod(shape) for shape in (entries.values() if isinstance(entries, dict) else [e[1] for e in entries]))
    assert count == 2_567_463_684
    message = sdxl_full_fine_tuning_refusal(UNetConfig.sdxl())
    assert "2.57 billion parameters" in message and "41.1 GB" in message and "--rank 4" in message
