"""`python -m porting mapping`: every layout's key table against the manifests of the real checkpoints, both
ways (our model's names written by the table, and the file's names read by it), and read back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from porting.mapping import LAYOUTS, model_and_keys, table, table_tsv

MANIFESTS = Path(__file__).parent / "manifests"


def manifest(layout: str) -> dict[str, tuple]:
    def load(name):
        return json.loads((MANIFESTS / name).read_text())
    if layout.startswith("sdxl-"):   # SDXL base's folder and single file
        if layout == "sdxl-diffusers-unet":
            d = load("sdxl_base_diffusers.json")["files"]["unet/diffusion_pytorch_model.safetensors"]
        elif layout == "sdxl-transformers-clip-projection":
            d = load("sdxl_base_diffusers.json")["files"]["text_encoder_2/model.safetensors"]
        else:
            prefix = {"sdxl-ldm-unet": "model.diffusion_model.", "sdxl-ldm-clip": "conditioner.embedders.0.",
                      "sdxl-openclip-text": "conditioner.embedders.1."}[layout]
            d = {k: v for k, v in load("sdxl_base_single_file.json")["model_tensors"].items() if k.startswith(prefix)}
    elif layout in ("diffusers-unet", "diffusers-vae"):
        part = "unet" if layout.endswith("unet") else "vae"
        d = load("sd_v1_diffusers.json")["files"][f"{part}/diffusion_pytorch_model.safetensors"]
    elif layout in ("ldm-unet", "ldm-vae"):
        prefix = "model.diffusion_model." if layout.endswith("unet") else "first_stage_model."
        d = {k: v for k, v in load("sd_v1_single_file.json")["model_tensors"].items() if k.startswith(prefix)}
    elif layout == "openclip-text":   # SD 2.x's single file's text tower, the whole OpenCLIP model
        d = {k: v for k, v in load("sd_v2_single_file.json")["model_tensors"].items() if k.startswith("cond_stage_model.")}
    elif layout.endswith("clip"):
        d = load("clip_sd_v1_single_file.json" if layout == "ldm-clip" else "clip_sd_v1_text_encoder.json")["tensors"]
    else:
        d = load("vit_timm_base_patch16_224.json" if layout == "timm-vit" else "vit_dima806_facial_emotions.json")
    return {k: tuple(v) for k, v in d.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_table_covers_the_manifest_both_ways(layout):
    rows = table(layout)
    expected = manifest(layout)
    got = {key: shape for key, _, shape, _ in rows}
    split = [k for k, _, _, t in rows if t == "split_in_proj"]
    assert all(split.count(k) == 3 for k in split), "split_in_proj: one checkpoint tensor per three keys of ours"
    assert len(got) == len(rows) - len(split) * 2 // 3, "a checkpoint key appears twice"
    assert not set(expected) - set(got), f"missing: {sorted(set(expected) - set(got))[:5]}"
    assert not set(got) - set(expected), f"left over: {sorted(set(got) - set(expected))[:5]}"
    assert {k: got[k] for k in expected} == expected
    fused = [o for _, o, _, t in rows if t == "fuse_qkv"]
    assert all(fused.count(o) == 3 for o in fused), "fuse_qkv: three checkpoint tensors per key of ours"


def _our_names(model, layout: str) -> list[str]:
    """Our model's tensor names as the table names them: transformers keeps q, k and v apart."""
    from vit.weights import split_qkv
    return list(split_qkv(model.state_dict()) if layout == "transformers-vit" else model.state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_table_reads_the_manifest_onto_our_model(layout):
    """Loading's direction: every key of the file is named by a row or dropped, no two onto one name, and
    the names are exactly our model's."""
    from clip.weights import split_in_proj, transpose_projection
    model, keys = model_and_keys(layout)
    names = (transpose_projection(split_in_proj(dict.fromkeys(manifest(layout)))) if layout == "sdxl-openclip-text"
             else split_in_proj(dict.fromkeys(manifest(layout))) if layout == "openclip-text" else manifest(layout))
    named = {k: keys.name(k) for k in names if not keys.drops(k)}
    assert not [k for k, ours in named.items() if ours is None], "keys of the file no row names"
    assert len(set(named.values())) == len(named), "two keys of the file onto one of ours"
    assert sorted(named.values()) == sorted(_our_names(model, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_table_reads_back_what_it_writes(layout):
    model, keys = model_and_keys(layout)
    for ours in _our_names(model, layout):
        assert keys.name(keys.name(ours, reverse=True)) == ours


def test_tsv_and_cli(capsys):
    assert ("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight\tlayers.3.self_attn.k_proj.weight\t"
            "3072x1024\tsplit_in_proj") in table_tsv("openclip-text")
    assert ("conditioner.embedders.1.model.text_projection\ttext_projection.weight\t1280x1280\ttranspose"
            in table_tsv("sdxl-openclip-text"))
    assert "model.diffusion_model.label_emb.0.0.weight\tadd_embedding.linear_1.weight\t1280x2816\t" in table_tsv("sdxl-ldm-unet")
    text = table_tsv("ldm-vae")
    assert "first_stage_model.decoder.mid.attn_1.q.weight\tdecoder.mid_block.attentions.0.to_q.weight\t512x512x1x1\tsqueeze_1x1" in text
    assert "vit.encoder.layer.0.attention.attention.key.bias\tblocks.0.attn.qkv.bias\t768\tfuse_qkv" in table_tsv("transformers-vit")
    from porting.__main__ import main
    assert main(["mapping", "--layout", "nope"]) == 2 and "choose one of" in capsys.readouterr().err
