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
  states for them (the first STATES positions); and the image of the first case's prompt with no embedding loaded (its word is then
  spelled in BPE pieces), which the embedded images must differ from;
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
    added = {t.content: i for i, t in pipe.tokenizer.added_tokens_decoder.items() if not t.special}
    return dict(case, added_tokens=added, converted_prompt=pipe.maybe_convert_prompt(prompt, pipe.tokenizer))


def plain_image(prompt: str) -> torch.Tensor:
    pipe = pipeline()
    image = pipe(prompt, **{k: v for k, v in RUN.items() if k != "seed"},
                 generator=torch.Generator().manual_seed(RUN["seed"]), output_type="np").images
    return torch.from_numpy((image * 255).round().astype(np.uint8))


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
    tensors["plain.image"] = plain_image(CASES["diffusers_one"]["prompt"])
    write_safetensors(OUT / "reference.safetensors", {k: v.contiguous() for k, v in tensors.items()})
    (OUT / "reference.json").write_text(json.dumps(dict(
        versions=versions(), run=RUN, files={k: dict(zip(("file", "format", "vectors", "stored_token"), v))
                                             for k, v in FILES.items()},
        cases=cases), indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/fixtures/textual_inversion: {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
