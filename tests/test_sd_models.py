"""UNet and VAE against diffusers' outputs (tests/fixtures/sd/reference.safetensors, made by
tools/make_reference_sd.py), loaded from both public layouts of the same tiny checkpoint."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.state_dict import read_safetensors
from diffusion.checkpoints import single_file
from diffusion.models.unet import UNet2DConditionModel, UNetConfig
from diffusion.models.unet_blocks import timestep_embedding
from diffusion.models.vae import VAEConfig
from diffusion.checkpoints.load import (load_unet_folder, load_unet_single_file, load_vae_folder, load_vae_single_file)
from diffusion.speed import (keep_the_layout_in_spatial_transformers, memory_format_of,
                             take_inputs_in_weights_layout, upsample2x_conv3x3, use_subpixel_upsamplers)

FIX = Path(__file__).parent / "fixtures" / "sd"
FOLDER, SINGLE = FIX / "tiny_diffusers", FIX / "tiny_single.safetensors"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIX / "reference.safetensors"))


@pytest.fixture(scope="module")
def models():
    """{layout: (unet, vae)}, both layouts of the same weights."""
    unet_t, vae_t, _ = single_file.split_single_file(read_safetensors(SINGLE), use_ema=False, source=str(SINGLE))
    unet_cfg = UNetConfig.from_json(FOLDER / "unet" / "config.json")
    vae_cfg = VAEConfig.from_json(FOLDER / "vae" / "config.json")
    return {"diffusers": (load_unet_folder(FOLDER).eval(), load_vae_folder(FOLDER).eval()),
            "single_file": (load_unet_single_file(unet_t, unet_cfg, source="single").eval(),
                            load_vae_single_file(vae_t, vae_cfg, source="single").eval())}


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_unet_eps_matches_diffusers(models, ref, layout):
    unet = models[layout][0]
    with torch.no_grad():
        for suffix in ("", "_int"):  # float and integer timesteps, a different t per batch item
            eps = unet(ref["unet.sample"], ref[f"unet.timesteps{suffix}"], ref["unet.encoder_hidden_states"])
            assert maxdiff(eps, ref[f"unet.eps{suffix}"]) <= TOL


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_vae_posterior_and_decode_match_diffusers(models, ref, layout):
    vae = models[layout][1]
    with torch.no_grad():
        post = vae.encode(ref["vae.image"])
        assert maxdiff(post.mean, ref["vae.mean"]) <= TOL
        assert maxdiff(post.std, ref["vae.std"]) <= TOL
        assert torch.equal(post.mode(), post.mean)
        # same noise as diffusers' DiagonalGaussianDistribution.sample(generator)
        assert maxdiff(post.sample(torch.Generator().manual_seed(7)), ref["vae.sample_seed7"]) <= TOL
        assert maxdiff(vae.decode(ref["vae.latents"]), ref["vae.decoded"]) <= TOL


def arranged_copies(models, memory_format=torch.channels_last):
    """Copies of the models with diffusion/speed.py's transformations, stored in `memory_format`."""
    unet, vae = (copy.deepcopy(m) for m in models["diffusers"])
    use_subpixel_upsamplers(vae.decoder)
    keep_the_layout_in_spatial_transformers(unet)
    for m in (unet, vae):
        m.to(memory_format=memory_format)
        take_inputs_in_weights_layout(m)
    return unet, vae


def test_channels_last_models_match_diffusers(models, ref):
    """diffusion/speed.py stores the models channels-last where that runs faster: same outputs."""
    unet, vae = arranged_copies(models)
    with torch.no_grad():
        eps = unet(ref["unet.sample"], ref["unet.timesteps"], ref["unet.encoder_hidden_states"])
        post = vae.encode(ref["vae.image"])
        decoded = vae.decode(ref["vae.latents"])
    assert maxdiff(eps, ref["unet.eps"]) <= TOL
    assert maxdiff(post.mean, ref["vae.mean"]) <= TOL and maxdiff(post.std, ref["vae.std"]) <= TOL
    assert maxdiff(decoded, ref["vae.decoded"]) <= TOL
    for out in (eps, decoded):  # (the posterior's mean is a channel slice of the moments: neither)
        assert memory_format_of(out) == torch.channels_last


@pytest.mark.parametrize("input_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_every_feature_map_keeps_the_models_layout(models, ref, memory_format, input_format):
    """No layout mixing inside a model arranged by diffusion/speed.py: every convolution and GroupNorm
    sees its input in the layout the weights are stored in (a mix measured slower than either layout,
    see speed.py), whichever layout the caller's input comes in."""
    unet, vae = arranged_copies(models, memory_format)
    seen = []

    def record(module, args):
        x = args[0]
        if x.ndim == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:  # both layouts tell apart
            if module is not vae.post_quant_conv:  # 1x1 weights, which both layouts describe: takes z as it comes
                seen.append((type(module).__name__, tuple(x.shape), memory_format_of(x)))

    hooks = [m.register_forward_pre_hook(record) for net in (unet, vae) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))]
    sample, image, latents = (ref[k].contiguous(memory_format=input_format)
                              for k in ("unet.sample", "vae.image", "vae.latents"))
    try:
        with torch.no_grad():
            unet(sample, ref["unet.timesteps"], ref["unet.encoder_hidden_states"])
            vae.encode(image)
            vae.decode(latents)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) > 50
    wrong = [s for s in seen if s[2] != memory_format]
    assert not wrong, f"{len(wrong)} of {len(seen)} inputs in the other layout, first: {wrong[:3]}"


def test_layouts_load_identical_tensors(models):
    for i in range(2):
        a, b = models["diffusers"][i].state_dict(), models["single_file"][i].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vae_spatial_factor_and_scaling_from_config():
    cfg = VAEConfig.from_json(FOLDER / "vae" / "config.json")
    assert cfg.spatial_factor == 4 and cfg.scaling_factor == 0.18215  # 3 levels in the tiny VAE
    assert VAEConfig.sd_v1().spatial_factor == 8


def test_decode_does_not_touch_its_input(models, ref):
    z = ref["vae.latents"].clone()
    with torch.no_grad():
        models["diffusers"][1].decode(z)
    assert torch.equal(z, ref["vae.latents"])


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 4, 1, 1), (3, 6, 4, 6)])
def test_subpixel_upsample_conv_equals_upsample_then_conv(shape):
    """The VAE's sub-pixel upsamplers fold the 3x3 kernel into four 2x2 ones (speed.upsample2x_conv3x3)."""
    gen = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, generator=gen, requires_grad=True)
    weight = torch.randn(C + 1, C, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(C + 1, generator=gen, requires_grad=True)
    plain = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
                                       weight, bias, padding=1)
    folded = upsample2x_conv3x3(x, weight, bias)
    assert folded.shape == (B, C + 1, 2 * H, 2 * W)
    assert memory_format_of(folded) == torch.contiguous_format
    x_last = x.detach().contiguous(memory_format=torch.channels_last)
    folded_last = upsample2x_conv3x3(x_last, weight.detach(), bias.detach())
    assert torch.allclose(folded_last, folded, atol=1e-5)
    assert memory_format_of(folded_last) == memory_format_of(x_last)  # channels-last in, channels-last out
    assert (folded - plain).abs().max() <= 1e-5
    grads = [torch.autograd.grad(out.square().sum(), (x, weight, bias)) for out in (plain, folded)]
    for g_plain, g_folded in zip(*grads):
        assert (g_plain - g_folded).abs().max() <= 1e-4 * g_plain.abs().max()


def test_timestep_embedding_is_batched():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0)
    assert emb.shape == (3, 8)
    one = timestep_embedding(t[1:2], 8, flip_sin_to_cos=True, freq_shift=0)
    assert torch.equal(emb[1:2], one)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # t=0: cos 1, sin 0


def test_unet_rejects_wrong_timestep_shape(models, ref):
    with pytest.raises(ValueError, match=r"timesteps of shape \(2,\) for a batch of 3"):
        models["diffusers"][0](ref["unet.sample"], torch.tensor([1, 2]), ref["unet.encoder_hidden_states"])


def test_gradient_checkpointing_gives_same_gradients(ref):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(config=UNetConfig.from_json(FOLDER / "unet" / "config.json"))
    args = (ref["unet.sample"][:1, :, :8, :8], ref["unet.timesteps"][:1], ref["unet.encoder_hidden_states"][:1, :5])
    grads = []
    for on in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = on
        unet(*args).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    assert unet.gradient_checkpointing
    # as diffusers: ResNets and the transformer blocks inside each spatial transformer are recomputed
    assert all(m.gradient_checkpointing for m in unet.modules() if type(m).__name__ == "SpatialTransformer")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_unet_config_sd_v1_preset_matches_public_config_fields():
    cfg = UNetConfig.sd_v1()
    assert cfg.block_out_channels == (320, 640, 1280, 1280) and cfg.attention_head_dim == 8
    assert cfg.cross_attention_dim == 768 and cfg.layers_per_block == 2


def test_config_refuses_unsupported_fields():
    raw = json.loads((FOLDER / "unet" / "config.json").read_text())
    UNetConfig.from_dict(raw)  # every diffusers field at its SD v1 value: accepted
    with pytest.raises(ValueError, match="dual_cross_attention=True"):   # (SD 2.x's use_linear_projection is read now)
        UNetConfig.from_dict({**raw, "dual_cross_attention": True})
    with pytest.raises(ValueError, match="unknown config field.*mystery"):
        UNetConfig.from_dict({**raw, "mystery": 1})
    with pytest.raises(ValueError, match="down_block_types"):
        UNetConfig.from_dict({**raw, "down_block_types": ["CrossAttnDownBlock2D", "Foo"]})
    vae_raw = json.loads((FOLDER / "vae" / "config.json").read_text())
    with pytest.raises(ValueError, match="shift_factor=0.1"):
        VAEConfig.from_dict({**vae_raw, "shift_factor": 0.1})
