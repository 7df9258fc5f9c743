"""diffusion/speed.py: each speed transformation alone, and all of them together, give the plain
models' numbers (<= 1e-5 in fp32) on the tiny SD fixtures, for both memory layouts of the model and
both layouts of the caller's input; the checkpoint keys do not change."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoints.load import load_unet_folder, load_vae_folder
from diffusion.models.unet_blocks import Upsample2D
from diffusion.models.attention import SpatialTransformer
from diffusion.speed import (SubpixelUpsample2D, arrange_for_speed, in_the_layout_of_the_input,
                             keep_the_layout_in_spatial_transformers, memory_format_of,
                             take_inputs_in_weights_layout, use_subpixel_upsamplers)

FIX = Path(__file__).parent / "fixtures" / "sd"
FOLDER = FIX / "tiny_diffusers"
TOL = 1e-5
FORMATS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIX / "reference.safetensors"))


@pytest.fixture(scope="module")
def plain():
    return SimpleNamespace(unet=load_unet_folder(FOLDER).eval(), vae=load_vae_folder(FOLDER).eval())


def outputs(unet, vae, ref, input_format):
    """UNet eps, VAE posterior mean and decoded image on the fixture inputs, given in `input_format`."""
    sample, image, latents = (ref[k].contiguous(memory_format=input_format)
                              for k in ("unet.sample", "vae.image", "vae.latents"))
    with torch.no_grad():
        return {"eps": unet(sample, ref["unet.timesteps"], ref["unet.encoder_hidden_states"]),
                "mean": vae.encode(image).mean, "decoded": vae.decode(latents)}


def assert_close(got, want):
    for k in want:
        diff = (got[k] - want[k]).abs().max().item()
        assert diff <= TOL, f"{k}: max |diff| {diff:.2e}"


@pytest.fixture(scope="module")
def plain_outputs(plain, ref):
    return outputs(plain.unet, plain.vae, ref, torch.contiguous_format)


@pytest.mark.parametrize("input_layout", FORMATS)
@pytest.mark.parametrize("model_layout", FORMATS)
def test_subpixel_upsamplers_equal_the_plain_ones(plain, ref, plain_outputs, model_layout, input_layout):
    vae = copy.deepcopy(plain.vae).to(memory_format=FORMATS[model_layout])
    assert use_subpixel_upsamplers(vae.decoder) == len(vae.decoder.up_blocks) - 1
    assert not any(type(m) is Upsample2D for m in vae.modules())
    assert all(type(b.upsamplers[0]) is SubpixelUpsample2D for b in vae.decoder.up_blocks[:-1])
    assert vae.state_dict().keys() == plain.vae.state_dict().keys()
    assert_close(outputs(plain.unet, vae, ref, FORMATS[input_layout]), plain_outputs)


@pytest.mark.parametrize("input_layout", FORMATS)
@pytest.mark.parametrize("model_layout", FORMATS)
def test_memory_layout_equals_the_plain_models(plain, ref, plain_outputs, model_layout, input_layout):
    """Channels-last storage, with what keeps a model in one layout (input hooks, layout-keeping
    spatial transformers), and channels-first storage with the same two."""
    unet, vae = copy.deepcopy(plain.unet), copy.deepcopy(plain.vae)
    for model in (unet, vae):
        model.to(memory_format=FORMATS[model_layout])
        assert take_inputs_in_weights_layout(model) > 0
    assert keep_the_layout_in_spatial_transformers(unet) > 0
    got = outputs(unet, vae, ref, FORMATS[input_layout])
    assert_close(got, plain_outputs)
    for k in ("eps", "decoded"):  # the output comes in the model's layout, whatever the input's
        assert memory_format_of(got[k]) == FORMATS[model_layout]


@pytest.mark.parametrize("input_layout", FORMATS)
def test_input_hooks_alone_equal_plain(plain, ref, plain_outputs, input_layout):
    """Only the conv_in hooks, on the channels-first models: a channels-last input is copied once."""
    unet, vae = copy.deepcopy(plain.unet), copy.deepcopy(plain.vae)
    assert [take_inputs_in_weights_layout(m) for m in (unet, vae)] == [1, 2]  # UNet; VAE encoder, decoder
    got = outputs(unet, vae, ref, FORMATS[input_layout])
    assert_close(got, plain_outputs)
    assert memory_format_of(got["eps"]) == torch.contiguous_format


@pytest.mark.parametrize("model_layout", FORMATS)
def test_layout_keeping_spatial_transformers_alone_equal_plain(plain, ref, plain_outputs, model_layout):
    """Only the spatial transformers changed (the model stored in `model_layout`, its input given in it):
    the same numbers, the same keys, and every transformer's output in the model's layout."""
    unet = copy.deepcopy(plain.unet).to(memory_format=FORMATS[model_layout])
    n = keep_the_layout_in_spatial_transformers(unet)
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert n == len(transformers) > 0 and all(m.arrange_map is in_the_layout_of_the_input for m in transformers)
    assert all(type(m) is SpatialTransformer for m in transformers)   # configured, not replaced
    assert unet.state_dict().keys() == plain.unet.state_dict().keys()
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(memory_format_of(out))) for m in transformers]
    got = outputs(unet, plain.vae, ref, FORMATS[model_layout])
    for h in hooks:
        h.remove()
    assert_close(got, plain_outputs)
    assert seen and all(f == FORMATS[model_layout] for f in seen)


@pytest.mark.parametrize("precision, layouts", [
    ("fp32", {"unet": "channels_first", "vae": "channels_last"}),
    ("bf16", {"unet": "channels_last", "vae": "channels_last"}),
    ("fp16", {"unet": "channels_first", "vae": "channels_first"})])
def test_arrange_for_speed_equals_plain_and_keeps_the_keys(plain, ref, plain_outputs, precision, layouts):
    models = copy.deepcopy(plain)
    assert arrange_for_speed(models, device=torch.device("cpu"), precision=precision) == layouts
    for name in ("unet", "vae"):
        assert getattr(models, name).state_dict().keys() == getattr(plain, name).state_dict().keys()
    for input_format in FORMATS.values():  # fp32 numbers: the precision only picked the layouts
        assert_close(outputs(models.unet, models.vae, ref, input_format), plain_outputs)
    # a second call (a resumed run, a test that arranges again) adds nothing
    hooks = sum(len(m._forward_pre_hooks) for net in (models.unet, models.vae) for m in net.modules())
    arrange_for_speed(models, device=torch.device("cpu"), precision=precision)
    assert hooks == sum(len(m._forward_pre_hooks) for net in (models.unet, models.vae) for m in net.modules())
    assert use_subpixel_upsamplers(models.vae) == 0 and take_inputs_in_weights_layout(models.unet) == 0
    assert keep_the_layout_in_spatial_transformers(models.unet) == 0


def test_arrange_for_speed_on_a_gpu_layout_stays_channels_first(plain):
    models = SimpleNamespace(vae=copy.deepcopy(plain.vae))  # one model is enough, as the benches pass
    assert arrange_for_speed(models, device=torch.device("cuda"), precision="bf16") == {"vae": "channels_first"}
    assert take_inputs_in_weights_layout(models.vae) == 0  # hooked already


def test_plain_models_hold_no_speed_code():
    """The model files read as the papers: no layout helpers, no sub-pixel form (STYLE.md rule 11)."""
    root = Path(__file__).parent.parent
    files = [*(root / "diffusion" / "models").glob("*.py"), root / "clip" / "text_model.py", root / "vit" / "model.py"]
    for path in files:
        text = path.read_text()
        for word in ("memory_format", "channels_last", "in_layout_of", "subpixel", "diffusion.speed"):
            assert word not in text, f"{path.name} mentions {word}"


def test_no_module_changes_an_objects_class():
    """A fast path configures a seam (STYLE.md rule 19): nothing outside tests/ assigns `__class__`, so a
    debugger always shows a module's own class and the one forward a learner reads."""
    import ast
    root = Path(__file__).parent.parent
    for path in root.rglob("*.py"):
        if {"tests", ".venv", ".venv-dev"} & set(path.relative_to(root).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            assert not any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in targets), \
                f"{path.relative_to(root)}:{node.lineno} assigns __class__"
