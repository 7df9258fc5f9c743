"""Dev-only: tiny LoRA files in every format we read, and what diffusers makes of them.

    .venv-dev/bin/python tools/make_reference_lora.py

Run after tools/make_reference_sd.py (it adapts that tiny model). Writes under tests/fixtures/lora/:
- peft.safetensors: diffusers' new keys (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`)
  with peft's `lora_adapter_metadata` giving lora_alpha != rank (and one alpha_pattern entry);
- diffusers.safetensors: what diffusers' train_dreambooth_lora.py writes (`.lora.down.weight`,
  text `.lora_linear_layer.up.weight`), alpha = rank;
- processors.safetensors: the old attention-processor keys with no `unet.` prefix
  (`<block>.attn1.processor.to_q_lora.down.weight`), UNet only;
- kohya.safetensors: kohya-ss keys with alpha 1 at rank 4, on attention, 1x1 proj_in,
  feed-forward, a 3x3 ResNet conv (conv LoRA), and text-encoder attention and MLP;
- trained/: a DreamBooth-LoRA that OUR train_dreambooth.py trained on the tiny model (--rank 4
  --train_text_encoder --lora_format kohya), checked to load in diffusers with no missing/unexpected key;
- reference.safetensors: per file, diffusers' UNet eps and text-encoder states with the adapter (unfused,
  scale 1), and the uint8 images of StableDiffusionPipeline after load_lora_weights + fuse_lora(lora_scale=s)
  for two scales; reference.json: the runs, the key counts diffusers loaded, and the trained-LoRA check.
Every up (B) weight is random and non-zero, so no update can vanish unnoticed.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.state_dict import write_safetensors  # noqa: E402

SD_FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
OUT = ROOT / "tests" / "fixtures" / "lora"
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
SCALES = (1.0, 0.6)
RUN = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=7.5, height=32, width=32, seed=0)


def pipeline():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(SD_FOLDER), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def linear_names(model, suffixes) -> list[str]:
    """Module names as the public files spell them: transformers >= 5.6 dropped CLIPTextModel's
    `text_model.` level, which every published text-encoder LoRA key (and transformers 4) has."""
    from transformers import CLIPTextModel
    prefix = "text_model." if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model") else ""
    return [prefix + n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n.endswith("." + s) for s in suffixes)]


def module(model, name: str):
    return model.get_submodule(name.removeprefix("text_model.") if not hasattr(model, "text_model") else name)


def pair(module, rank: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in[, k, k]) and B (out, rank[, 1, 1]), both random and non-zero."""
    w = module.weight
    if w.ndim == 2:
        return 0.3 * torch.randn(rank, w.shape[1], generator=gen), 0.3 * torch.randn(w.shape[0], rank, generator=gen)
    return (0.3 * torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen),
            0.3 * torch.randn(w.shape[0], rank, 1, 1, generator=gen))


def make_files(pipe) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    unet, text = pipe.unet, pipe.text_encoder
    unet_attn, text_attn = linear_names(unet, UNET_ATTN), linear_names(text, TEXT_ATTN)
    files = {}

    sd = {}                                               # peft keys, alphas in the metadata
    for n in unet_attn:
        a, b = pair(module(unet, n), 4, gen)
        sd[f"unet.{n}.lora_A.weight"], sd[f"unet.{n}.lora_B.weight"] = a, b
    for n in text_attn:
        a, b = pair(module(text, n), 4, gen)
        sd[f"text_encoder.{n}.lora_A.weight"], sd[f"text_encoder.{n}.lora_B.weight"] = a, b
    meta = {"unet.r": 4, "unet.lora_alpha": 2, "unet.target_modules": list(UNET_ATTN),
            "unet.alpha_pattern": {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": 12},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 6, "text_encoder.target_modules": list(TEXT_ATTN)}
    files["peft"] = dict(tensors=sd, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})

    sd = {}                                               # train_dreambooth_lora.py's keys, alpha = rank
    for n in unet_attn:
        a, b = pair(module(unet, n), 3, gen)
        sd[f"unet.{n}.lora.down.weight"], sd[f"unet.{n}.lora.up.weight"] = a, b
    for n in text_attn:
        a, b = pair(module(text, n), 3, gen)
        sd[f"text_encoder.{n}.lora_linear_layer.down.weight"] = a
        sd[f"text_encoder.{n}.lora_linear_layer.up.weight"] = b
    files["diffusers"] = dict(tensors=sd, metadata={"format": "pt"})

    sd = {}                                               # old attention processors, no prefix
    old = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    for n in unet_attn:
        proj = next(p for p in UNET_ATTN if n.endswith("." + p))
        block = n[:-len(proj) - 1]
        a, b = pair(module(unet, n), 2, gen)
        sd[f"{block}.processor.{old[proj]}.down.weight"], sd[f"{block}.processor.{old[proj]}.up.weight"] = a, b
    files["processors"] = dict(tensors=sd, metadata={"format": "pt"})

    sd = {}                                               # kohya: flat names, per-module alpha, conv LoRA
    kohya_unet = unet_attn + [n for n, m in unet.named_modules() if n.endswith(("proj_in", "ff.net.0.proj",
                                                                                "ff.net.2", "resnets.0.conv1"))]
    kohya_text = text_attn + linear_names(text, ("mlp.fc1", "mlp.fc2"))
    # One alpha for all (kohya's --network_alpha), != rank. diffusers 0.42.1 reads per-module kohya alphas
    # into peft's alpha_pattern under names that match no module (peft warns and drops them), so a file
    # with differing alphas would not be a reference; tests/test_lora.py checks those against eq. 3 itself.
    alphas = (1.0,)
    for prefix, model, names in (("lora_unet_", unet, kohya_unet), ("lora_te_", text, kohya_text)):
        for i, n in enumerate(names):
            flat = prefix + n.replace(".", "_")
            a, b = pair(module(model, n), 4, gen)
            sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = a, b
            sd[f"{flat}.alpha"] = torch.tensor(alphas[i % len(alphas)])
    files["kohya"] = dict(tensors=sd, metadata={"ss_network_module": "networks.lora"})
    return files


class Warnings(logging.Handler):
    """diffusers' and peft's warnings while loading (missing/unexpected keys are reported there)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load(pipe, path: Path) -> None:
    """pipe.load_lora_weights; a file with no unet. prefix (which load_lora_weights passes over, with a
    warning) through the UNet's own load_lora_adapter(prefix=None), as diffusers advises."""
    tensors = load_file(str(path))
    if any(k.startswith(("unet.", "text_encoder.", "lora_")) for k in tensors):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    else:
        pipe.unet.load_lora_adapter(tensors, prefix=None, adapter_name="default_0")


def load_checked(pipe, path: Path) -> dict:
    """load_lora_weights, demanding no warning about keys and an adapter on every module of the file."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    handler = Warnings()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(handler)
    load(pipe, path)
    for name in ("diffusers", "peft"):
        logging.getLogger(name).removeHandler(handler)
    bad = [m for m in handler.messages if "key" in m.lower() or "missing" in m.lower()]
    if bad:
        sys.exit(f"{path}: diffusers warned while loading: {bad}")
    adapted = {part: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, part).modules())
               for part in ("unet", "text_encoder")}
    return dict(adapted_modules=adapted, warnings=handler.messages)


def reference(name: str, path: Path, tensors: dict, expected_modules: int) -> dict:
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_warning()
    gen = torch.Generator().manual_seed(1)
    pipe = pipeline()
    info = load_checked(pipe, path)
    if sum(info["adapted_modules"].values()) != expected_modules:
        sys.exit(f"{name}: diffusers adapted {info['adapted_modules']} modules, the file has {expected_modules}")
    with torch.no_grad():
        x, t, c = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=gen)
        ids = pipe.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        tensors.update({f"{name}.unet.sample": x, f"{name}.unet.t": t, f"{name}.unet.context": c,
                        f"{name}.unet.eps": pipe.unet(x, t, c).sample, f"{name}.text.ids": ids,
                        f"{name}.text.states": pipe.text_encoder(ids).last_hidden_state})
    runs = []
    for scale in SCALES:
        pipe = pipeline()
        load(pipe, path)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()          # the fused weights stay, the adapters go
        run = {k: v for k, v in RUN.items() if k != "seed"}
        image = pipe(**run, generator=torch.Generator().manual_seed(RUN["seed"]), output_type="np").images
        tensors[f"{name}.image.{scale}"] = torch.from_numpy((image * 255).round().astype(np.uint8))
        runs.append(scale)
    return dict(info, scales=runs)


def train_ours() -> dict:
    """Train a DreamBooth-LoRA with OUR train_dreambooth.py, then load its output in diffusers."""
    from PIL import Image
    work = OUT / "_train_tmp"
    shutil.rmtree(work, ignore_errors=True)
    (work / "instance").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(work / "instance" / f"{i}.png")
    out = OUT / "trained"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(SD_FOLDER),
           "--instance_data_dir", str(work / "instance"), "--instance_prompt", "a photo of sks dog",
           "--resolution", "16", "--train_batch_size", "1", "--max_train_steps", "2", "--rank", "4",
           "--train_text_encoder", "--learning_rate", "1e-2", "--lora_format", "kohya", "--device", "cpu",
           "--output_dir", str(work / "out")]
    subprocess.run(cmd, check=True, cwd=ROOT)
    out.mkdir()
    for f in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        shutil.copy(work / "out" / f, out / f)
    shutil.rmtree(work)
    pipe = pipeline()
    info = load_checked(pipe, out / "pytorch_lora_weights.safetensors")
    n = len([k for k in load_file(str(out / "pytorch_lora_weights.safetensors")) if k.endswith("down.weight")])
    if sum(info["adapted_modules"].values()) != n:
        sys.exit(f"trained: diffusers adapted {info['adapted_modules']} modules, the file has {n}")
    return dict(info, command="train_dreambooth.py " + " ".join(cmd[2:]).replace(str(ROOT) + "/", ""),
                check="StableDiffusionPipeline.load_lora_weights(trained/): no missing or unexpected key, "
                      f"an adapter on all {n} modules of the file")


def main() -> None:
    import diffusers
    import peft
    OUT.mkdir(parents=True, exist_ok=True)
    files = make_files(pipeline())
    tensors, runs = {}, {}
    for name, f in files.items():
        path = OUT / f"{name}.safetensors"
        write_safetensors(path, {k: v.contiguous() for k, v in f["tensors"].items()}, f["metadata"])   # sorted
        n = len([k for k in f["tensors"] if k.endswith("down.weight") or k.endswith("lora_A.weight")])
        runs[name] = reference(name, path, tensors, n)
        print(f"{name}: {n} modules, diffusers adapted {runs[name]['adapted_modules']}")
    trained = train_ours()
    runs["trained"] = reference("trained", OUT / "trained" / "pytorch_lora_weights.safetensors", tensors,
                                sum(trained["adapted_modules"].values()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(dict(
        diffusers_version=diffusers.__version__, peft_version=peft.__version__, run=RUN, scales=SCALES,
        files=runs, trained_check=trained), indent=1) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/fixtures/lora: {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
