"""Dev-only: the fixtures of DreamBooth's evaluation (DINO, CLIP-I, CLIP-T, PRES) from transformers, timm and
torchvision.

    .venv-dev/bin/python tools/make_reference_eval.py

Builds tiny random checkpoints in the published layouts (every tensor perturbed, so no zero- or one-init
hides a mapping bug), runs the reference libraries on held-out images and writes:

  tests/fixtures/dino/hf_vitmodel/       facebook/dino-vits16's layout: transformers ViTModel without a pooler
                                         (as transformers' convert_dino_to_pytorch.py saves it), 224x224,
                                         16x16 patches, 6 heads as ViT-S, 24 wide
  tests/fixtures/dino/timm/              timm's vit_small_patch16_224.dino layout (num_classes=0), saved by
                                         timm's own save_for_hf (model.safetensors + config.json)
  tests/fixtures/dino/reference.safetensors
      pixels         DINO's evaluation transform (torchvision Resize(256, bicubic), CenterCrop(224),
                     ToTensor, Normalize) of tests/fixtures/images, every 14th pixel from (3, 5)
      hf_cls, timm_cls   each layout's [CLS] embedding after the final LayerNorm for those images
                     (ViTModel last_hidden_state[:, 0]; timm forward with num_classes=0)
  tests/fixtures/clip_model/l14/         a ViT-L/14-shaped CLIPModel (text + vision + projections +
                                         logit_scale): 224 pixels, 14x14 patches, 16 wide; its tokenizer is
                                         the embedded world model's (613 ids, the end token 612 pools)
  tests/fixtures/clip_model/b32_vision/  a ViT-B/32-shaped CLIPVisionModelWithProjection, 64 pixels
  tests/fixtures/clip_model/b32_text/    a CLIPTextModelWithProjection with SD v1's legacy eos_token_id 2
  tests/fixtures/clip_model/reference.safetensors
      l14_pixels, b32_pixels     CLIPImageProcessor (PIL path, CLIPImageProcessorPil) of tests/fixtures/images
                                 (every 14th / 4th pixel)
      l14_image, b32_image       get_image_features of those images
      l14_ids, l14_text          CLIPTokenizer ids of PROMPTS (padded to 77) and get_text_features
      b32_ids, b32_text          random ids (the end token mid-row) and get_text_features
  tests/fixtures/evaluate/               held-out folders: real/ (4 photos of "the subject", one an
                                         EXIF-rotated JPEG), generated/ (6, with prompts.jsonl),
                                         class_generated/ (3)
  tests/fixtures/evaluate/reference.json DreamBooth's numbers on those folders, computed here with
                                         transformers' ViTModel (hf) or timm (timm) for DINO and transformers'
                                         CLIPModel + CLIPTokenizer + CLIPImageProcessorPil for CLIP
  tests/manifests/dino_vits16.json, timm_vit_small_patch16_224_dino.json, clip_vit_b32_full.json:
      every tensor name and shape of the real checkpoints (from the reference classes)

The definitions (Ruiz et al. 2023, sec. 4.1), written here once more, independently of dreambooth/metrics.py:
  dino    mean over every (generated, real) pair of cos(DINO(g), DINO(r))
  clip_i  the same with CLIP image embeddings
  clip_t  mean over generated images of cos(CLIP image(g), CLIP text(prompt of g))
  pres    mean over every (class-generated, real) pair of cos(DINO(c), DINO(r))
  real_dino, real_clip_i   mean over pairs of distinct real images (the paper's "Real Images" row)
Regenerating writes the same bytes (fixed seeds, sorted keys).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.state_dict import write_safetensors  # noqa: E402  (metadata sorted: the same contents, the same bytes)

FIX = ROOT / "tests" / "fixtures"
IMAGES = FIX / "images"
DINO, CLIPM, EVAL = FIX / "dino", FIX / "clip_model", FIX / "evaluate"
MANIFESTS = ROOT / "tests" / "manifests"
WORLD_TOKENIZER = ROOT / "embedded" / "world_sd" / "tokenizer"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROMPTS = ["a sks dog in the jungle", "a red sks dog", "a dog", "a sks dog wearing a santa hat"]
TOKEN = "sks"


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Add N(0, 0.1) noise to every floating parameter (zeros and ones included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def load(paths: list[Path]) -> list[Image.Image]:
    from transformers.image_utils import load_image   # EXIF orientation applied, RGB
    return [load_image(str(p)) for p in paths]


# ---- held-out folders --------------------------------------------------------------------------
def draw_subject(size: tuple[int, int], seed: int, body: tuple[int, int, int]) -> Image.Image:
    """A blob "animal" (body, head, ears, eyes) on a textured background: a stand-in subject."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = (rng.random((h, w, 3)) * 70 + rng.integers(40, 170, 3)).astype(np.uint8)
    image = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(image)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.45, 0.65)
    d.ellipse([cx - w * 0.3, cy - h * 0.15, cx + w * 0.25, cy + h * 0.2], fill=body)
    d.ellipse([cx + w * 0.12, cy - h * 0.35, cx + w * 0.38, cy - h * 0.05], fill=body)
    d.polygon([(cx + w * 0.15, cy - h * 0.3), (cx + w * 0.2, cy - h * 0.45), (cx + w * 0.25, cy - h * 0.3)],
              fill=tuple(c // 2 for c in body))
    d.ellipse([cx + w * 0.27, cy - h * 0.25, cx + w * 0.31, cy - h * 0.21], fill=(10, 10, 10))
    return image


def make_folders() -> dict[str, list[Path]]:
    """Sizes chosen so that both crops meet odd margins (where torchvision and transformers split them
    differently) and both orientations; one real photo is a JPEG with an EXIF rotation."""
    shutil.rmtree(EVAL, ignore_errors=True)
    for sub in ("real", "generated", "class_generated"):
        (EVAL / sub).mkdir(parents=True)
    brown, grey = (120, 80, 40), (150, 150, 160)
    draw_subject((91, 72), 1, brown).save(EVAL / "real" / "00.png")
    draw_subject((64, 80), 2, brown).save(EVAL / "real" / "01.png")
    draw_subject((70, 70), 3, brown).save(EVAL / "real" / "02.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                  # display rotated 90 degrees clockwise
    draw_subject((96, 60), 4, brown).save(EVAL / "real" / "03.jpg", exif=exif, quality=92)
    lines = []
    for i, (size, colour, prompt) in enumerate([
            ((64, 64), brown, PROMPTS[0]), ((67, 59), (100, 90, 40), PROMPTS[0]), ((80, 100), brown, PROMPTS[0]),
            ((64, 64), (200, 30, 30), PROMPTS[1]), ((75, 64), (180, 60, 40), PROMPTS[1]), ((64, 81), (220, 20, 20), PROMPTS[1])]):
        name = f"{i:05d}.png"
        draw_subject(size, 10 + i, colour).save(EVAL / "generated" / name)
        lines.append(json.dumps({"image": name, "prompt": prompt}))
    (EVAL / "generated" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    for i, size in enumerate([(64, 64), (72, 91), (88, 64)]):
        draw_subject(size, 20 + i, grey).save(EVAL / "class_generated" / f"class-{i:05d}.png")
    return {sub: image_files(EVAL / sub) for sub in ("real", "generated", "class_generated")}


# ---- transforms ----------------------------------------------------------------------------------
def dino_transform():
    from torchvision import transforms as T
    return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def dino_pixels(images) -> torch.Tensor:
    t = dino_transform()
    return torch.stack([t(im) for im in images])


def sample(pixels: torch.Tensor, stride: int) -> torch.Tensor:
    return pixels[:, :, 3::stride, 5::stride].contiguous()


# ---- DINO -----------------------------------------------------------------------------------------
DINO_SIZE = dict(hidden=24, heads=6, layers=2, mlp=48)


def make_dino() -> dict:
    import timm
    from transformers import ViTConfig, ViTModel
    from timm.models._hub import save_for_hf
    shutil.rmtree(DINO, ignore_errors=True)
    DINO.mkdir(parents=True)
    hf = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=DINO_SIZE["hidden"],
                            num_hidden_layers=DINO_SIZE["layers"], num_attention_heads=DINO_SIZE["heads"],
                            intermediate_size=DINO_SIZE["mlp"], layer_norm_eps=1e-12), add_pooling_layer=False).eval()
    perturb(hf, 31)
    hf.save_pretrained(DINO / "hf_vitmodel")
    args = dict(embed_dim=DINO_SIZE["hidden"], depth=DINO_SIZE["layers"], num_heads=DINO_SIZE["heads"],
                mlp_ratio=DINO_SIZE["mlp"] / DINO_SIZE["hidden"])
    tm = timm.create_model("vit_small_patch16_224.dino", pretrained=False, **args).eval()
    assert tm.num_classes == 0 and tm.norm.eps == 1e-6
    perturb(tm, 32)
    save_for_hf(tm, str(DINO / "timm"), model_args=args, safe_serialization=True)
    keys = set(load_file(str(DINO / "hf_vitmodel" / "model.safetensors")))
    assert not any(k.startswith("pooler.") for k in keys) and "embeddings.cls_token" in keys, sorted(keys)[:5]

    images = load(image_files(IMAGES))
    pixels = dino_pixels(images)
    with torch.no_grad():
        ref = {"pixels": sample(pixels, 14), "hf_cls": hf(pixel_values=pixels).last_hidden_state[:, 0],
               "timm_cls": tm(pixels)}
    write_safetensors(DINO / "reference.safetensors", {k: v.contiguous() for k, v in ref.items()},
                      {"images": json.dumps([p.name for p in image_files(IMAGES)]), "sample": "[:, :, 3::14, 5::14]"})
    return {"hf": hf, "timm": tm}


# ---- CLIP -----------------------------------------------------------------------------------------
def clip_processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def make_clip() -> dict:
    from transformers import (CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)
    from transformers import CLIPTextConfig, CLIPVisionConfig
    shutil.rmtree(CLIPM, ignore_errors=True)
    CLIPM.mkdir(parents=True)
    images = load(image_files(IMAGES))
    ref = {}

    # ViT-L/14 shape: the full CLIPModel file, with the world model's tokenizer and CLIPImageProcessor's file
    l14_text = dict(vocab_size=613, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    bos_token_id=611, eos_token_id=612, pad_token_id=612)
    l14_vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                      patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    l14 = CLIPModel(CLIPConfig(text_config=l14_text, vision_config=l14_vision, projection_dim=12)).eval()
    perturb(l14, 41)
    folder = CLIPM / "l14"
    l14.save_pretrained(folder)
    clip_processor(224).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(WORLD_TOKENIZER / name, folder / name)
    config = json.loads((WORLD_TOKENIZER / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}, indent=2) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert int(ids[0, 0]) == 611 and (ids == 612).any(dim=1).all()
    pixels = clip_processor(224)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref.update(l14_pixels=sample(pixels, 14), l14_image=l14.get_image_features(pixel_values=pixels).pooler_output,
                   l14_ids=ids, l14_text=l14.get_text_features(input_ids=ids).pooler_output)

    # ViT-B/32 shape: the two one-tower files, 64-pixel images, SD v1's legacy end-token pooling
    b32_vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=32,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=6)).eval()
    perturb(b32_vision, 42)
    b32_vision.save_pretrained(CLIPM / "b32_vision")
    clip_processor(64).save_pretrained(CLIPM / "b32_vision")
    b32_text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=6)).eval()
    perturb(b32_text, 43)
    b32_text.save_pretrained(CLIPM / "b32_text")
    g = torch.Generator().manual_seed(44)
    b32_ids = torch.randint(3, 198, (3, 20), generator=g)
    b32_ids[:, 0], b32_ids[0, 19], b32_ids[1, 7], b32_ids[2, 12] = 198, 199, 199, 199   # the end token: the largest id
    pixels = clip_processor(64)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref.update(b32_pixels=sample(pixels, 4), b32_image=b32_vision(pixel_values=pixels).image_embeds,
                   b32_ids=b32_ids, b32_text=b32_text(input_ids=b32_ids).text_embeds)
    write_safetensors(CLIPM / "reference.safetensors", {k: v.contiguous() for k, v in ref.items()},
                      {"images": json.dumps([p.name for p in image_files(IMAGES)]), "prompts": json.dumps(PROMPTS),
                       "sample": "l14: [:, :, 3::14, 5::14], b32: [:, :, 3::4, 5::4]"})
    return {"model": l14, "tokenizer": tokenizer, "processor": clip_processor(224)}


# ---- the numbers ------------------------------------------------------------------------------------
def cos_mean(a: torch.Tensor, b: torch.Tensor, *, distinct: bool = False) -> float:
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    s = a @ b.T
    if distinct:                       # pairs of two different images of one set
        s = s[~torch.eye(len(a), dtype=torch.bool)]
    return s.mean().item()


def metrics(folders, dino, clip) -> dict:
    with torch.no_grad():
        def dino_embed(paths):
            x = dino_pixels(load(paths))
            return dino(pixel_values=x).last_hidden_state[:, 0] if hasattr(dino, "config") else dino(x)
        def clip_image(paths):
            x = clip["processor"](load(paths), return_tensors="pt")["pixel_values"]
            return clip["model"].get_image_features(pixel_values=x).pooler_output
        def clip_text(prompts):
            ids = clip["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return clip["model"].get_text_features(input_ids=ids).pooler_output
        real, gen, cls = folders["real"], folders["generated"], folders["class_generated"]
        prompt_of = {}
        for line in (EVAL / "generated" / "prompts.jsonl").read_text().splitlines():
            row = json.loads(line)
            prompt_of[row["image"]] = row["prompt"]
        prompts = [prompt_of[p.name] for p in gen]
        d_real, d_gen, d_cls = dino_embed(real), dino_embed(gen), dino_embed(cls)
        c_real, c_gen = clip_image(real), clip_image(gen)
        t = clip_text(prompts)
        dropped = clip_text([" ".join(w for w in p.split() if w != TOKEN) for p in prompts])
        return {
            "dino": cos_mean(d_gen, d_real), "clip_i": cos_mean(c_gen, c_real),
            "clip_t": torch.nn.functional.cosine_similarity(c_gen.double(), t.double()).mean().item(),
            "clip_t_drop_token": torch.nn.functional.cosine_similarity(c_gen.double(), dropped.double()).mean().item(),
            "pres": cos_mean(d_cls, d_real),
            "real_dino": cos_mean(d_real, d_real, distinct=True), "real_clip_i": cos_mean(c_real, c_real, distinct=True),
        }


# ---- manifests of the real checkpoints ---------------------------------------------------------------
def manifests() -> None:
    import timm
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    def write(name: str, what: str, tensors: dict) -> None:
        doc = {"checkpoint": what, "made_by": "tools/make_reference_eval.py",
               "tensors": dict(sorted((k, list(v)) for k, v in tensors.items()))}
        (MANIFESTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"manifest {name}: {len(tensors)} tensors")
    # transformers 5 renames ViT modules in memory and back on saving: the manifest is read from a save
    dino = ViTModel(ViTConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=6), add_pooling_layer=False)
    with tempfile.TemporaryDirectory() as tmp:
        dino.save_pretrained(tmp)
        write("dino_vits16", "model.safetensors of facebook/dino-vits16 (ViTModel, no pooler)",
              {k: v.shape for k, v in load_file(str(Path(tmp) / "model.safetensors")).items()})
    with torch.device("meta"):
        tm = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
        b32 = CLIPModel(CLIPConfig(text_config={}, vision_config={}, projection_dim=512))
    write("timm_vit_small_patch16_224_dino", "model.safetensors of timm/vit_small_patch16_224.dino",
          {k: v.shape for k, v in tm.state_dict().items()})
    write("clip_vit_b32_full", "model.safetensors of openai/clip-vit-base-patch32 (CLIPModel)",
          {k: v.shape for k, v in b32.state_dict().items()})


def main() -> None:
    torch.manual_seed(0)
    folders = make_folders()
    dino = make_dino()
    clip = make_clip()
    numbers = {"made_by": "tools/make_reference_eval.py", "drop_token": TOKEN,
               "counts": {k: len(v) for k, v in folders.items()}}
    for layout, model in dino.items():
        numbers[layout] = metrics(folders, model, clip)
    (EVAL / "reference.json").write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    print(json.dumps(numbers, indent=1, sort_keys=True))
    # at least one image of each folder set must meet an odd margin where the two crop rules differ
    sizes = [im.size for im in load(sum(folders.values(), []))]
    def margins(size, edge, crop):
        w, h = size
        long_ = int(edge * max(w, h) / min(w, h))
        return long_ - crop
    assert any(margins(s, 256, 224) % 4 == 3 for s in sizes), "no image exercises DINO's half-to-even crop"
    assert any(margins(s, 224, 224) % 2 == 1 for s in sizes), "no image exercises CLIP's floor crop"
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    manifests()
    total = sum(p.stat().st_size for d in (DINO, CLIPM, EVAL) for p in d.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
