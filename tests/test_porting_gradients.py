"""`python -m porting trace --backward`: every parameter's gradient under the checkpoint's keys, against the
reference libraries' own autograd.

The reference gradients come from tools/make_reference_gradients.py: transformers 5.24 (ViT classifier and
backbone, CLIP text model), timm 1.0.31 (ViT) and diffusers 0.42 (UNet, VAE encoder and decoder) load the
tiny fixture checkpoints, run on tests/fixtures/traces/<inputs>_backward_inputs.safetensors and call
backward on F.mse_loss(output.float(), target.float()); each gradient is stored under the key of the file
holding the parameter's values. In fp32 each gradient must be within 1e-5 of the reference's largest value
among its module's gradients (porting/compare.py says why not its own), the loss too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.state_dict import read_safetensors, safetensors_metadata
from porting.__main__ import main
from porting.compare import compare, read_trace
from porting.components import load_component
from porting.trace import GRAD, trace, write_trace

FIXTURES = Path(__file__).parent / "fixtures"
TRACES = FIXTURES / "traces"
SD = FIXTURES / "sd" / "tiny_diffusers"
SINGLE = FIXTURES / "sd" / "tiny_single.safetensors"
# reference gradients -> (component, checkpoint, inputs): <inputs>_backward_inputs.safetensors
CASES = {"vit": ("vit", FIXTURES / "vit" / "hf_classifier", "vit"),
         "vit_timm": ("vit", FIXTURES / "vit" / "timm", "vit"),
         "vit_backbone": ("vit", FIXTURES / "vit" / "hf_vitmodel", "vit_backbone"),
         "text_encoder": ("text_encoder", FIXTURES / "clip" / "text_encoder", "text_encoder"),
         "unet": ("unet", SD, "unet"),
         "vae_encoder": ("vae_encoder", SD, "vae_encoder"),
         "vae_decoder": ("vae_decoder", SD, "vae_decoder")}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    return read_safetensors(TRACES / f"{name}_backward_inputs.safetensors")


def _held_to_the_reference(reference_file: Path, ours: dict[str, torch.Tensor], tmp_path: Path, rtol: float = 1e-5):
    """The loss and every gradient of the reference, no other gradient, each within rtol (porting.compare)."""
    reference, _ = read_trace(reference_file)
    grads = {k for k in ours if k.startswith(GRAD)}
    assert set(reference) == grads | {"loss"}, (sorted(set(reference) - grads)[:5], sorted(grads - set(reference))[:5])
    out = tmp_path / "ours.safetensors"
    write_trace(out, {k: ours[k] for k in reference}, {})
    result = compare(reference_file, out, rtol=rtol)
    worst = max(result.lines, key=lambda line: line.rel)
    versions = safetensors_metadata(reference_file).get("versions")
    assert not result.beyond, f"beyond {rtol:g}: {result.beyond[:5]} (worst {worst.key}: {worst.rel:.2e}; made with {versions})"


@pytest.mark.parametrize("case", list(CASES))
def test_every_gradient_matches_the_reference_library(case, tmp_path):
    """Measured (torch 2.13 here, 2.14 there; the fixtures made on AVX512+bf16): on that kind of CPU CLIP and
    timm's ViT bit-equal, transformers' ViT 3.2e-7 at most, the VAE 5.6e-7, the UNet 3.5e-6 (median 9e-7:
    diffusers' own fp32 UNet output moves by 1e-6 with where its tensors sit in memory); with torch's AVX2
    kernels (ATEN_CPU_CAPABILITY=avx2) 2.8e-6 at most. The forward half is the forward trace, unchanged."""
    component, model, inputs = CASES[case]
    loaded = load_component(model, component)
    ours = trace(loaded, _inputs(inputs), backward=True)
    _held_to_the_reference(TRACES / f"{case}_gradients_reference.safetensors", ours, tmp_path)
    forward = trace(loaded, _inputs(inputs))           # the target is left alone without backward
    keys = list(ours)
    assert keys[:len(forward)] == list(forward) and keys[len(forward)] == "loss"
    assert all(torch.equal(ours[k], forward[k]) for k in forward)
    assert all(k.startswith(GRAD) for k in keys[len(forward) + 1:])


def _same_values(single: Path, folder: Path) -> dict[str, str]:
    """The single file's key -> the diffusers folder's key holding the same values (make_reference_sd.py wrote
    the file from the folder's tensors, and diffusers' from_single_file reads them back bit-identical): a
    pairing of names independent of our key tables."""
    theirs: dict[tuple, list[str]] = {}
    folder_tensors = {}
    for part in ("unet", "vae"):
        for k, v in read_safetensors(folder / part / "diffusion_pytorch_model.safetensors").items():
            folder_tensors[f"{part}/{k}"] = v
            theirs.setdefault((v.numel(), v.double().sum().item()), []).append(f"{part}/{k}")
    out = {}
    for k, v in read_safetensors(single).items():
        found = [f for f in theirs.get((v.numel(), v.double().sum().item()), [])
                 if torch.equal(folder_tensors[f].flatten(), v.flatten())]
        if found:
            assert len(found) == 1, (k, found)
            out[k] = found[0].split("/", 1)[1]
    return out


@pytest.mark.parametrize("case", ["unet", "vae_decoder"])
def test_a_single_file_gets_its_own_names_and_the_same_gradients(case, tmp_path):
    """From the original single file, the gradients are named by its keys (model.diffusion_model.input_blocks...,
    first_stage_model.decoder.up..., the VAE attention's 1x1 convs in their (C, C, 1, 1) shape) and are the
    diffusers folder's, which holds the same tensors."""
    component, _, inputs = CASES[case]
    ours = trace(load_component(SINGLE, component, config_dir=SD), _inputs(inputs), backward=True)
    pairs = _same_values(SINGLE, SD)
    grads = [k for k in ours if k.startswith(GRAD)]
    prefix = {"unet": "model.diffusion_model.", "vae_decoder": "first_stage_model."}[case]
    assert all(k.startswith(GRAD + prefix) for k in grads)
    reference, _ = read_trace(TRACES / f"{case}_gradients_reference.safetensors")
    renamed = {"loss": ours["loss"]}
    for k in grads:
        key = GRAD + pairs[k[len(GRAD):]]
        assert ours[k].numel() == reference[key].numel()
        renamed[key] = ours[k].reshape(reference[key].shape)
    if case == "vae_decoder":
        assert ours[GRAD + "first_stage_model.decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    _held_to_the_reference(TRACES / f"{case}_gradients_reference.safetensors", renamed, tmp_path)


def test_our_names_and_a_fused_qkv(tmp_path):
    """--names ours: grad:<our parameter>; our fused qkv's gradient is transformers' query, key and value
    gradients stacked (vit/weights.py fuse_qkv). Tracing twice gives the same gradients (none accumulate)."""
    component = load_component(CASES["vit"][1], "vit")
    ours = trace(component, _inputs("vit"), names="ours", backward=True)
    again = trace(component, _inputs("vit"), names="ours", backward=True)
    assert all(torch.equal(ours[k], again[k]) for k in ours)
    reference, _ = read_trace(TRACES / "vit_gradients_reference.safetensors")
    part = lambda p: reference[f"{GRAD}vit.encoder.layer.1.attention.attention.{p}.weight"]
    fused = ours[GRAD + "blocks.1.attn.qkv.weight"]
    torch.testing.assert_close(fused, torch.cat([part("query"), part("key"), part("value")]), rtol=0, atol=1e-6)
    assert {k for k in ours if k.startswith(GRAD)} == {GRAD + n for n, _ in component.model.named_parameters()}


@pytest.mark.parametrize("case, bound", [("text_encoder", 0.1), ("unet", 0.15)])
def test_bf16_gradients_are_in_bf16_and_near_fp32(case, bound, tmp_path):
    """--precision bf16 --backward: the weights and their gradients in bf16, the loss in fp32. No bf16 reference
    is stored (its bits would depend on the kind of CPU); against the fp32 one, measured worst 3.1e-2 (CLIP) and
    7.7e-2 (UNet) of a module's largest gradient on AVX512+bf16, 5.6e-2 and 6.9e-2 with torch's AVX2 kernels
    (ATEN_CPU_CAPABILITY=avx2), medians 1.3e-2 to 2.6e-2: bounds to catch a gradient gone wrong, not rounding."""
    component, model, inputs = CASES[case]
    ours = trace(load_component(model, component), _inputs(inputs), precision="bf16", backward=True)
    assert ours["loss"].dtype == torch.float32
    assert {v.dtype for k, v in ours.items() if k.startswith(GRAD)} == {torch.bfloat16}
    _held_to_the_reference(TRACES / f"{case}_gradients_reference.safetensors", ours, tmp_path, rtol=bound)


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_cli_backward_trace_and_compare(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    reference = TRACES / "vit_gradients_reference.safetensors"
    code, io = _run(["trace", "--model", CASES["vit"][1], "--component", "vit", "--inputs",
                     TRACES / "vit_backward_inputs.safetensors", "--out", out, "--backward"], capsys)
    assert code == 0 and re.search(r"35 module outputs, the loss 1\.4266\d* and 40 gradients", io.out), io.out + io.err
    code, io = _run(["compare", reference, out, "--rtol", "1e-5"], capsys)
    assert code == 0 and "41 shared keys (40 gradients), 0 beyond" in io.out, io.out
    code, io = _run(["compare", TRACES / "vit_reference.safetensors", out], capsys)   # the forward half
    assert code == 0 and "26 shared keys, 0 beyond" in io.out, io.out

    tensors, order = read_trace(out)
    noise = GRAD + "vit.encoder.layer.0.attention.attention.key.bias"    # zero in exact arithmetic: noise only
    tensors[noise] = tensors[noise] + 1e-7
    save_file(tensors, str(out), metadata={"order": json.dumps(order)})
    code, io = _run(["compare", reference, out, "--rtol", "1e-5"], capsys)
    assert code == 0, io.out
    wrong = GRAD + "vit.encoder.layer.1.attention.attention.query.bias"  # a port wrong from here on
    tensors[wrong] = tensors[wrong] * 1.01
    tensors[GRAD + "vit.embeddings.cls_token"] = tensors[GRAD + "vit.embeddings.cls_token"] * 1.01
    save_file(tensors, str(out), metadata={"order": json.dumps(order)})
    code, io = _run(["compare", reference, out, "--rtol", "1e-5"], capsys)
    assert code == 1
    assert re.search(rf"{re.escape(wrong)} .*<-- first beyond rtol", io.out), io.out
    assert re.search(r"grad:vit\.embeddings\.cls_token .*beyond$", io.out, re.M)


@pytest.mark.parametrize("case, message", [
    ("no target", r"--backward: \S*in\.safetensors holds no 'target' tensor .*; it holds pixel_values"),
    ("wrong shape", r"--backward: target has shape \(2, 6\); the vit's output has shape \(2, 7\)"),
    ("int target", r"--backward: target has dtype torch\.int64"),
])
def test_cli_backward_bad_target_exits_2_and_writes_nothing(case, message, tmp_path, capsys):
    inputs = {"pixel_values": torch.zeros(2, 3, 32, 32)}
    if case != "no target":
        inputs["target"] = torch.zeros(2, 6) if case == "wrong shape" else torch.zeros(2, 7, dtype=torch.int64)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    code, io = _run(["trace", "--model", CASES["vit"][1], "--component", "vit", "--inputs", tmp_path / "in.safetensors",
                     "--out", tmp_path / "out.safetensors", "--backward"], capsys)
    assert code == 2 and re.search(message, io.err) and io.err.count("\n") == 1, io.err
    assert list(tmp_path.iterdir()) == [tmp_path / "in.safetensors"]
