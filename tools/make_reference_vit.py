"""Dev-only: regenerate the ViT reference fixtures under tests/fixtures/ from transformers and timm.

    .venv-dev/bin/python tools/make_reference_vit.py

Builds tiny random checkpoints in the public layouts (every tensor perturbed, so no zero- or one-init
hides a mapping bug), runs the reference implementations on a fixed image set, and stores inputs and
outputs. Also writes the key/shape manifests of the real full-size checkpoints (from the reference
classes on the meta device) and checks that a folder exported by our code loads in transformers.
This is the only ViT code that imports transformers or timm; the tests read what it writes.
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
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGES = ROOT / "tests/fixtures/images"
OUT = ROOT / "tests/fixtures/vit"
MANIFESTS = ROOT / "tests/manifests"
LABELS = ["sad", "disgust", "angry", "neutral", "fear", "surprise", "happy"]


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Add N(0, 0.1) noise to every parameter and buffer, zeros and ones included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))


def draw_face(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A simple drawn face on a textured background, so resizing sees edges and gradients."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = (rng.random((h, w, 3)) * 60 + rng.integers(60, 180, 3)).astype(np.uint8)
    image = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(image)
    skin = tuple(int(c) for c in rng.integers(120, 240, 3))
    d.ellipse([w * 0.2, h * 0.12, w * 0.8, h * 0.9], fill=skin, outline=(30, 20, 10))
    for ex in (0.38, 0.62):
        d.ellipse([w * ex - w * 0.05, h * 0.4, w * ex + w * 0.05, h * 0.47], fill=(20, 20, 20))
    d.arc([w * 0.35, h * 0.55, w * 0.65, h * 0.78], 10, 170, fill=(120, 20, 20), width=max(1, w // 24))
    return image.convert(mode) if mode != "RGB" else image


def make_images() -> list[Path]:
    """The fixed image set: several PIL modes, odd sizes, an EXIF-rotated JPEG, a FER2013-like gray PNG."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    for old in IMAGES.iterdir():
        old.unlink()
    files = {}
    files["rgb.jpg"] = lambda p: draw_face((72, 60), 1).save(p, quality=90)
    files["gray48.png"] = lambda p: draw_face((48, 48), 2, "L").save(p)
    rgba = draw_face((50, 64), 3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((50, 64)))
    files["rgba.png"] = lambda p: rgba.save(p)
    files["la.png"] = lambda p: draw_face((40, 40), 4, "LA").save(p)
    files["palette.png"] = lambda p: draw_face((45, 31), 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(p)
    files["cmyk.jpg"] = lambda p: draw_face((64, 64), 6, "CMYK").save(p, quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files["exif_rotated.jpg"] = lambda p: draw_face((80, 50), 7).save(p, exif=exif, quality=90)
    i16 = (np.asarray(draw_face((33, 47), 8, "L"), dtype=np.uint16) * 3)
    files["gray16.png"] = lambda p: Image.fromarray(i16.astype(np.uint16)).save(p)  # mode I;16
    files["odd_size.png"] = lambda p: draw_face((97, 13), 9).save(p)
    paths = []
    for name, write in files.items():
        write(IMAGES / name)
        paths.append(IMAGES / name)
    return paths


def tiny_hf_config(**kw):
    from transformers import ViTConfig
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, layer_norm_eps=1e-12, hidden_act="gelu",
                id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    return ViTConfig(**{**base, **kw})


def main() -> None:
    from transformers import ViTForImageClassification, ViTModel, pipeline
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    from transformers.image_utils import load_image
    import timm

    torch.manual_seed(0)
    paths = make_images()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    ref: dict[str, torch.Tensor] = {}
    meta: dict = {"images": [p.name for p in paths]}

    # 1. transformers ViTForImageClassification: the dima806 layout, 7 labels, with a preprocessor.
    hf = ViTForImageClassification(tiny_hf_config()).eval()
    perturb(hf, 1)
    hf.save_pretrained(OUT / "hf_classifier")
    proc = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc.save_pretrained(OUT / "hf_classifier")
    images = [load_image(str(p)) for p in paths]
    pv = proc(images, return_tensors="pt")["pixel_values"]
    ref["pixel_values_32"] = pv
    # A second, non-square preprocessor with ImageNet statistics checks size and mean/std handling.
    proc2 = ViTImageProcessorPil(size={"height": 40, "width": 56}, image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225])
    ref["pixel_values_40x56"] = proc2(images, return_tensors="pt")["pixel_values"]
    meta["preprocess_40x56"] = proc2.to_dict()
    with torch.no_grad():
        ref["hf_classifier_logits"] = hf(pixel_values=pv).logits
        pv48 = ViTImageProcessorPil(size={"height": 48, "width": 48}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)(images, return_tensors="pt")["pixel_values"]
        ref["pixel_values_48"] = pv48
        ref["hf_classifier_logits_48"] = hf(pixel_values=pv48, interpolate_pos_encoding=True).logits
    clf = pipeline("image-classification", model=str(OUT / "hf_classifier"), image_processor=proc, device="cpu")
    meta["pipeline_top_k_7"] = {p.name: clf(str(p), top_k=7) for p in paths}
    meta["pipeline_default"] = {p.name: clf(str(p)) for p in paths[:2]}

    # 2. transformers ViTModel with its pooler: google's in21k layout (no head, no "vit." prefix).
    vm = ViTModel(tiny_hf_config(id2label=None, label2id=None, num_labels=2), add_pooling_layer=True).eval()
    perturb(vm, 2)
    vm.save_pretrained(OUT / "hf_vitmodel")
    with torch.no_grad():
        ref["hf_vitmodel_last_hidden_state"] = vm(pixel_values=pv).last_hidden_state

    # 3. timm VisionTransformer (fused qkv, LayerNorm eps 1e-6), saved as timm saves for the hub.
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                           depth=2, num_heads=4, mlp_ratio=2.0, num_classes=7).eval()
    perturb(tm, 3)
    (OUT / "timm").mkdir()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(OUT / "timm/model.safetensors"))
    (OUT / "timm/config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 7, "num_features": 32, "global_pool": "token",
        "label_names": LABELS,
        "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 32, 32]}}, indent=2))
    with torch.no_grad():
        ref["timm_logits"] = tm(pv)

    # 4. A bare .safetensors with no config (architecture from shapes: 64-wide heads, as ViT-B has).
    bare = ViTForImageClassification(tiny_hf_config(hidden_size=128, num_attention_heads=2,
                                                    intermediate_size=96, num_hidden_layers=1)).eval()
    perturb(bare, 4)
    (OUT / "bare").mkdir()
    with tempfile.TemporaryDirectory() as tmp:  # transformers 5 renames modules in memory: save to get file names
        bare.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "model.safetensors", OUT / "bare/weights.safetensors")
    with torch.no_grad():
        ref["bare_logits"] = bare(pixel_values=pv).logits

    save_file({k: v.contiguous() for k, v in ref.items()}, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1))

    # 5. Our export loads in transformers with nothing missing or unexpected, and gives the same logits.
    from vit.weights import load_vit, save_pretrained
    loaded = load_vit(OUT / "hf_classifier")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(loaded.model, loaded.preprocess, tmp)
        back, info = ViTForImageClassification.from_pretrained(tmp, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise SystemExit(f"transformers reports problems loading our export: {problems}")
        with torch.no_grad():
            diff = (back.eval()(pixel_values=pv).logits - ref["hf_classifier_logits"]).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"our export differs in transformers by {diff}")
        print(f"export check: transformers loads our folder cleanly, logits max diff {diff:.2e}")

    # 6. Key/shape manifests of the real full-size checkpoints, from the reference classes on meta.
    from transformers import ViTConfig
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    # transformers 5 names its modules differently in memory (vit.layers.N.attention.q_proj) and converts
    # back to the published names (vit.encoder.layer.N.attention.attention.query) when saving, so the
    # manifest is read from a real save of a full-size model; timm saves its state_dict as it is.
    def saved_shapes(model):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return {k: list(v.shape) for k, v in load_file(Path(tmp) / "model.safetensors").items()}
    dima = ViTForImageClassification(ViTConfig(id2label=dict(enumerate(LABELS)),
                                               label2id={l: i for i, l in enumerate(LABELS)}))
    in21k = ViTModel(ViTConfig(), add_pooling_layer=True)
    with torch.device("meta"):
        timm_b16 = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=7)
    for name, manifest in (("vit_dima806_facial_emotions", saved_shapes(dima)),
                           ("vit_google_in21k", saved_shapes(in21k)),
                           ("vit_timm_base_patch16_224", {k: list(v.shape) for k, v in timm_b16.state_dict().items()})):
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(manifest.items())]
        (MANIFESTS / f"{name}.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"manifest {name}: {len(manifest)} tensors")
    total = sum(f.stat().st_size for f in list(OUT.rglob("*")) + list(IMAGES.rglob("*")) if f.is_file())
    print(f"fixtures written: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
