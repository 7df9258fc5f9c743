"""Dev-only: textual-inversion embeddings in every format we read, and what diffusers makes of them.

    .venv-dev/bin/python tools/make_reference_textual_inversion.py

Run after tools/make_reference_sd.py (its tiny model, text width 32) and tools/make_reference_training.py
(its tiny_sd, text width 8). Writes under tests/fixtures/textual_inversion/:
- the embedding files, random vectors of about the token embedding's scale times 10 (so that each changes
  the image): diffusers' learned_embeds.safetensors layout ({token: (n, 32)}) with one and with three
  vectors; A1111's .pt ({"string_to_param": {"*": ...}, "name", "step", ...}) with one and two; rinongal's
  .pt (string_to_param an nn.ParameterDict, no name) with two; A1111's .safetensors ({"emb_params": ...})
  with one and four; and a folder holding diffusers' learned_embeds.bin (two vectors);
- reference.safetensors: for each case, the uint8 image of StableDiffusionPipeline after
  load_textual_inversion(file(s), token=...) with the case's prompt (and negative prompt), the token ids of
  the prompt as the pipeline encodes it (maybe_convert_prompt, then the tokenizer) and the text encoder's
  states for them (the first STATES positions); and each case's image with no embedding loaded (its words then
  tokenise as BPE pieces), which the embedded image must differ from;
- trained/learned_embeds.safetensors: an embedding OUR train_textual_inversion.py trained on the tiny model
  (`train_ours`), read by diffusers' load_textual_inversion (the "trained" case and its check);
- reference.json: the cases (files, tokens, prompts) and the versions.
Under tests/fixtures/training/, from the same diffusers:
- textual_inversion.json + textual_inversion_<case>.safetensors: diffusers' examples/textual_inversion/
  textual_inversion.py loop reproduced step for step (`textual_inversion_reference`) on tiny_sd, 3 optimizer
  steps on recorded examples (image, template, flip) and draws: per micro-batch the loss, the pixels its
  dataset made and the token ids; per step the learning rate, the new rows' gradient and the rows after
  the AdamW step (and the script's restore of every other row).
Regenerating is byte-identical: one thread, fixed seeds, sorted keys.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.state_dict import write_safetensors  # noqa: E402

SD_FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
OUT = ROOT / "tests" / "fixtures" / "textual_inversion"
RUN = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32, seed=0)
STATES = 24   # the text states kept: the first 24 positions (every prompt's words and end token)
SCALE = 0.5    # the vectors' std; the tiny text encoder's token rows have about 0.05

# name -> (file under OUT, format, vectors, the token the file stores or None, extra A1111 fields)
FILES = {
    "diffusers_one": ("one.safetensors", "diffusers", 1, "<one>"),
    "diffusers_multi": ("multi.safetensors", "diffusers", 3, "<multi>"),
    "a1111_pt_one": ("a1111-one.pt", "a1111_pt", 1, None),
    "a1111_pt_multi": ("a1111-multi.pt", "a1111_pt", 2, None),
    "rinongal_pt_multi": ("rinongal.pt", "rinongal_pt", 2, None),
    "a1111_safetensors_one": ("emb-one.safetensors", "a1111_safetensors", 1, None),
    "a1111_safetensors_multi": ("emb-multi.safetensors", "a1111_safetensors", 4, None),
    "diffusers_bin_folder": ("concept/learned_embeds.bin", "diffusers_bin", 2, "<concept>"),
}
# Each case: the --embedding values (FILE or FILE:TOKEN, FILE relative to OUT), the prompt and the negative prompt.
CASES = {
    "diffusers_one": dict(embeddings=["one.safetensors"], prompt="a photo of <one> on a table"),
    "diffusers_multi": dict(embeddings=["multi.safetensors"], prompt="a <multi> in the snow"),
    "a1111_pt_one": dict(embeddings=["a1111-one.pt"], prompt="a painting of a1111-one"),
    "a1111_pt_multi": dict(embeddings=["a1111-multi.pt"], prompt="a1111-multi, a portrait"),
    "rinongal_pt_multi": dict(embeddings=["rinongal.pt:<rin>"], prompt="a photo of a <rin> cat"),
    "a1111_safetensors_one": dict(embeddings=["emb-one.safetensors"], prompt="emb-one on the beach"),
    "a1111_safetensors_multi": dict(embeddings=["emb-multi.safetensors"], prompt="a drawing in emb-multi style"),
    "diffusers_bin_folder": dict(embeddings=["concept"], prompt="a <concept> on a shelf"),
    "two_files_negative": dict(embeddings=["one.safetensors", "multi.safetensors"], prompt="<one> next to a dog",
                               negative_prompt="<multi>, blurry"),
    "renamed": dict(embeddings=["multi.safetensors:<renamed>"], prompt="a <renamed> and a <renamed>"),
}


def pipeline(folder: Path = SD_FOLDER):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- the files
def write_files() -> None:
    """Every file of FILES under OUT, its vectors from one seeded generator in FILES' order."""
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name, (file, kind, n, token) in FILES.items():
        vectors = SCALE * torch.randn(n, 32, generator=gen)
        path = OUT / file
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "diffusers":
            write_safetensors(path, {token: vectors}, {"format": "pt"})
        elif kind == "diffusers_bin":
            torch.save({token: vectors}, path)
        elif kind == "a1111_safetensors":
            write_safetensors(path, {"emb_params": vectors})
        elif kind == "a1111_pt":   # as A1111's Embedding.save writes it
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem,
                        "step": 3000, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "tiny_diffusers"}, path)
        else:                      # rinongal's EmbeddingManager.save: a ParameterDict, no name
            torch.save({"string_to_token": {"*": torch.tensor(265)},
                        "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})}, path)


def diffusers_source(value: str):
    """What load_textual_inversion gets for one --embedding value: the file (or folder) and the token. A file
    diffusers cannot read is read here and its vectors handed over as a tensor with the token (which it
    accepts): rinongal's .pt (torch.load(weights_only=True) refuses its ParameterDict, and diffusers looks
    up an A1111 "name" entry such a file does not have)."""
    path, token = (value.rsplit(":", 1) + [None])[:2] if ":" in value else (value, None)
    full = OUT / path
    if full.suffix == ".pt" and token is None:
        token = full.stem                     # our rule: the file's name (diffusers reads "name")
    if full.suffix == ".safetensors" and "emb_params" in _keys(full):
        token = token or full.stem            # diffusers would call it "emb_params"
    if full.name == "rinongal.pt":
        return torch.load(full, weights_only=False)["string_to_param"]["*"].detach(), token   # our own file
    return str(full), token


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def reference_case(name: str, case: dict, tensors: dict) -> dict:
    pipe = pipeline()
    sources = [diffusers_source(v) for v in case["embeddings"]]
    tokens = [t for _, t in sources]
    # token=[None, None] is multiplied by the number of files in diffusers 0.42 (then refused): None for all
    pipe.load_textual_inversion([s for s, _ in sources], token=None if tokens == [None] * len(tokens) else tokens)
    prompt, negative = case["prompt"], case.get("negative_prompt")
    for key, text in (("", prompt), ("negative.", negative)):
        if text is not None:
            converted = pipe.maybe_convert_prompt(text, pipe.tokenizer)
            ids = pipe.tokenizer(converted, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                tensors[f"{name}.{key}ids"] = ids
                tensors[f"{name}.{key}states"] = pipe.text_encoder(ids)[0][:, :STATES]
    image = pipe(prompt, negative_prompt=negative, **{k: v for k, v in RUN.items() if k != "seed"},
                 generator=torch.Generator().manual_seed(RUN["seed"]), output_type="np").images
    tensors[f"{name}.image"] = torch.from_numpy((image * 255).round().astype(np.uint8))
    tensors[f"{name}.plain_image"] = plain_image(prompt, negative)
    added = {t.content: i for i, t in pipe.tokenizer.added_tokens_decoder.items() if not t.special}
    return dict(case, added_tokens=added, converted_prompt=pipe.maybe_convert_prompt(prompt, pipe.tokenizer))


TRAINED_PROMPT = "a photo of a <trained> on the grass"


def train_ours() -> dict:
    """Train an embedding with OUR train_textual_inversion.py on the tiny model (two vectors, 4 steps), keep its
    learned_embeds.safetensors under OUT/trained/, and load it in diffusers (load_textual_inversion on the
    folder, as a user gives a trained output folder): the token and rows it added are recorded with the check."""
    import os
    import subprocess
    work = OUT / "_train_tmp"
    shutil.rmtree(work, ignore_errors=True)
    (work / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3)).astype(np.uint8)).save(work / "photos" / f"{i}.png")
    cmd = [sys.executable, str(ROOT / "train_textual_inversion.py"), "--pretrained_model_name_or_path", str(SD_FOLDER),
           "--train_data_dir", str(work / "photos"), "--placeholder_token", "<trained>", "--initializer_token", "a",
           "--num_vectors", "2", "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "4",
           "--learning_rate", "5e-2", "--device", "cpu", "--output_dir", str(work / "out")]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (OUT / "trained").mkdir()
    shutil.copy(work / "out" / "learned_embeds.safetensors", OUT / "trained" / "learned_embeds.safetensors")
    shutil.rmtree(work)
    pipe = pipeline()
    pipe.load_textual_inversion(str(OUT / "trained"))
    added = {t.content: i for i, t in pipe.tokenizer.added_tokens_decoder.items() if not t.special}
    if list(added) != ["<trained>", "<trained>_1"]:
        sys.exit(f"trained: diffusers added {added}")
    rows = pipe.text_encoder.get_input_embeddings().weight[list(added.values())].detach()
    return dict(command="train_textual_inversion.py " + " ".join(cmd[2:]).replace(str(ROOT) + "/", ""),
                added_tokens=added, rows_shape=list(rows.shape),
                check="StableDiffusionPipeline.load_textual_inversion(trained/): learned_embeds.safetensors read, "
                      "<trained> and <trained>_1 added with the file's two rows")


def plain_image(prompt: str, negative: str | None) -> torch.Tensor:
    """The case's image without its embeddings: their words then tokenise as BPE pieces."""
    pipe = pipeline()
    image = pipe(prompt, negative_prompt=negative, **{k: v for k, v in RUN.items() if k != "seed"},
                 generator=torch.Generator().manual_seed(RUN["seed"]), output_type="np").images
    return torch.from_numpy((image * 255).round().astype(np.uint8))


# ---------------------------------------------------------------- diffusers' textual_inversion.py loop
TINY_SD = ROOT / "tests" / "fixtures" / "training" / "tiny_sd"
TRAINING = ROOT / "tests" / "fixtures" / "training"
STEPS, RESOLUTION, PHOTO = 3, 16, (20, 24)      # 3 optimizer steps; 16x16 crops of three 20x24 photos
# The script's flags for each case (not named: its defaults; AdamW betas 0.9/0.999, weight decay 1e-2, eps 1e-8).
TI_BASE = dict(placeholder_token="<ti>", initializer_token="the", learnable_property="object", num_vectors=1,
               center_crop=False, train_batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-3,
               lr_scheduler="constant", lr_warmup_steps=0, prediction_type="epsilon")
TI_CASES = {
    "a_object": dict(TI_BASE),
    "b_style_multivector_accumulation": dict(TI_BASE, learnable_property="style", num_vectors=3, center_crop=True,
                                             gradient_accumulation_steps=2, lr_scheduler="cosine"),
    "c_v_prediction": dict(TI_BASE, num_vectors=2, prediction_type="v_prediction"),
}


def textual_inversion_inputs(case: dict, seed: int) -> dict[str, torch.Tensor]:
    """Three photos (uint8, H x W = PHOTO) and, per micro-batch, each example's choices (photo, template, flip:
    what the script's shuffled DataLoader, random.choice and RandomHorizontalFlip would pick) and the draws
    (the VAE posterior sample's noise, the noise, the timesteps), from one seeded generator."""
    from dreambooth.inversion import TEMPLATE_SETS
    g = torch.Generator().manual_seed(seed)
    B, n = case["train_batch_size"], STEPS * case["gradient_accumulation_steps"]
    latent = (4, RESOLUTION // 2, RESOLUTION // 2)
    out = {"photos": torch.randint(0, 256, (3, *PHOTO, 3), generator=g, dtype=torch.uint8)}
    for k in range(n):
        out[f"{k}.choices"] = torch.stack([torch.randint(0, 3, (B,), generator=g),
                                           torch.randint(0, len(TEMPLATE_SETS[case["learnable_property"]]), (B,),
                                                         generator=g),
                                           torch.randint(0, 2, (B,), generator=g)], dim=1)      # (B, 3)
        out[f"{k}.posterior"] = torch.randn((B, *latent), generator=g)
        out[f"{k}.noise"] = torch.randn((B, *latent), generator=g)
        out[f"{k}.timesteps"] = torch.randint(0, 1000, (B,), generator=g)
    return out


def script_example(photo: np.ndarray, template: str, flip: bool, placeholder_string: str, center_crop: bool):
    """TextualInversionDataset.__getitem__ with its random picks given: the text, the uint8 image after its
    crop, bicubic resize and flip, and pixel_values as it computes them."""
    from PIL import Image
    from torchvision import transforms
    image = Image.fromarray(photo)
    if not image.mode == "RGB":
        image = image.convert("RGB")
    text = template.format(placeholder_string)
    img = np.array(image).astype(np.uint8)
    if center_crop:
        crop = min(img.shape[0], img.shape[1])
        h, w = img.shape[0], img.shape[1]
        img = img[(h - crop) // 2: (h + crop) // 2, (w - crop) // 2: (w + crop) // 2]
    image = Image.fromarray(img)
    image = image.resize((RESOLUTION, RESOLUTION), resample=Image.Resampling.BICUBIC)
    if flip:                                  # RandomHorizontalFlip(p=0.5) when its torch.rand(1) < 0.5
        image = transforms.functional.hflip(image)
    image = np.array(image).astype(np.uint8)
    shown = torch.from_numpy(image.copy()).permute(2, 0, 1)
    image = (image / 127.5 - 1.0).astype(np.float32)
    return text, shown, torch.from_numpy(image).permute(2, 0, 1)


def textual_inversion_reference(case: dict, inputs: dict) -> tuple[dict, dict]:
    """diffusers' examples/textual_inversion/textual_inversion.py (commit 1eeddd0), its set-up and training loop
    as the script runs them through accelerate, for STEPS optimizer steps. The script's lines are kept in their
    order; where it draws random numbers the recorded ones are used (latent_dist.sample() is mean + std * draw,
    torch.randn_like and torch.randint the recorded noise and timesteps), and the examples come from
    `script_example` with the recorded picks instead of its DataLoader. The templates are
    dreambooth/inversion.py's lists (transcribed from the script's imagenet_templates_small and
    imagenet_style_templates_small); the test checks the prompts' token ids against the ones recorded here."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from dreambooth.inversion import TEMPLATE_SETS
    AcceleratorState._reset_state(reset_partial_state=True)    # one script run per case: a fresh accelerate
    GradientState._reset_state()
    folder = str(TINY_SD)
    accelerator = Accelerator(gradient_accumulation_steps=case["gradient_accumulation_steps"], mixed_precision="no",
                              cpu=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler",
                                                    prediction_type=case["prediction_type"])
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")

    placeholder_tokens = [case["placeholder_token"]]
    placeholder_tokens += [f"{case['placeholder_token']}_{i}" for i in range(1, case["num_vectors"])]
    num_added_tokens = tokenizer.add_tokens(placeholder_tokens)
    assert num_added_tokens == case["num_vectors"]
    token_ids = tokenizer.encode(case["initializer_token"], add_special_tokens=False)
    assert len(token_ids) == 1
    initializer_token_id = token_ids[0]
    placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_token_ids:
            token_embeds[token_id] = token_embeds[initializer_token_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)   # transformers >= 5.6 dropped the level
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=case["learning_rate"],
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
    placeholder_string = " ".join(tokenizer.convert_ids_to_tokens(placeholder_token_ids))
    templates = TEMPLATE_SETS[case["learnable_property"]]
    lr_scheduler = get_scheduler(case["lr_scheduler"], optimizer=optimizer,
                                 num_warmup_steps=case["lr_warmup_steps"] * accelerator.num_processes,
                                 num_training_steps=STEPS * accelerator.num_processes, num_cycles=1)
    text_encoder.train()
    text_encoder, optimizer, lr_scheduler = accelerator.prepare(text_encoder, optimizer, lr_scheduler)
    weight_dtype = torch.float32
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    orig_embeds_params = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight.data.clone()
    ids = slice(min(placeholder_token_ids), max(placeholder_token_ids) + 1)
    record = {"rows.0": orig_embeds_params[ids].clone()}
    scalars, global_step, k = {"loss": [], "lr": []}, 0, 0
    photos = inputs["photos"].numpy()
    while global_step < STEPS:
        examples = [script_example(photos[int(i)], templates[int(t)], bool(f), placeholder_string,
                                   case["center_crop"]) for i, t, f in inputs[f"{k}.choices"].tolist()]
        input_ids = torch.stack([tokenizer(text, padding="max_length", truncation=True,
                                           max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
                                 for text, _, _ in examples])
        batch = {"pixel_values": torch.stack([p for _, _, p in examples]), "input_ids": input_ids}
        record[f"{k}.shown"] = torch.stack([shown for _, shown, _ in examples])
        record[f"{k}.input_ids"] = input_ids
        with accelerator.accumulate(text_encoder):
            latent_dist = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist
            latents = (latent_dist.mean + latent_dist.std * inputs[f"{k}.posterior"]).detach()
            latents = latents * vae.config.scaling_factor
            noise = inputs[f"{k}.noise"].to(latents.dtype)
            timesteps = inputs[f"{k}.timesteps"].long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"])[0].to(dtype=weight_dtype)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            scalars["loss"].append(loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients:   # the gradient the step uses (after accumulation)
                weight = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight
                record[f"grad.{global_step + 1}"] = weight.grad[ids].clone()
                scalars["lr"].append(lr_scheduler.get_last_lr()[0])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
            index_no_updates[min(placeholder_token_ids): max(placeholder_token_ids) + 1] = False
            with torch.no_grad():
                accelerator.unwrap_model(text_encoder).get_input_embeddings().weight[index_no_updates] = (
                    orig_embeds_params[index_no_updates])
        k += 1
        if accelerator.sync_gradients:
            global_step += 1
            weight = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight
            record[f"rows.{global_step}"] = weight[ids].detach().clone()
            if not torch.equal(weight[index_no_updates], orig_embeds_params[index_no_updates]):
                sys.exit("the script's restore left another row changed")
    return record, dict(scalars, placeholder_ids=placeholder_token_ids, placeholder_string=placeholder_string)


def write_training_fixtures() -> None:
    cases = {}
    for n, (name, case) in enumerate(TI_CASES.items()):
        inputs = textual_inversion_inputs(case, seed=n)
        record, scalars = textual_inversion_reference(case, inputs)
        write_safetensors(TRAINING / f"textual_inversion_{name}.safetensors",
                          {k: v.contiguous() for k, v in {**inputs, **record}.items()}, {"format": "pt"})
        cases[name] = dict(flags=case, script="diffusers examples/textual_inversion/textual_inversion.py", steps=STEPS,
                           **scalars)
        print(f"textual inversion {name}: loss {[round(x, 6) for x in scalars['loss']]}, lr {scalars['lr']}")
    (TRAINING / "textual_inversion.json").write_text(json.dumps(dict(
        versions=versions(), model="tests/fixtures/training/tiny_sd", resolution=RESOLUTION, photo=list(PHOTO),
        steps=STEPS, cases=cases), indent=1, sort_keys=True) + "\n")


def versions() -> dict:
    import accelerate
    import diffusers
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def main() -> None:
    torch.set_num_threads(1)
    write_files()
    tensors, cases = {}, {}
    for name, case in CASES.items():
        cases[name] = reference_case(name, case, tensors)
        print(f"{name}: {cases[name]['converted_prompt']!r}, added {cases[name]['added_tokens']}")
    trained = train_ours()
    cases["trained"] = reference_case("trained", dict(embeddings=["trained"], prompt=TRAINED_PROMPT), tensors)
    cases["trained"]["trained_check"] = trained
    write_safetensors(OUT / "reference.safetensors", {k: v.contiguous() for k, v in tensors.items()})
    (OUT / "reference.json").write_text(json.dumps(dict(
        versions=versions(), run=RUN, files={k: dict(zip(("file", "format", "vectors", "stored_token"), v))
                                             for k, v in FILES.items()},
        cases=cases), indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/fixtures/textual_inversion: {size / 1e3:.0f} kB")
    write_training_fixtures()


if __name__ == "__main__":
    main()
