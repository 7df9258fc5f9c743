"""Dev-only: reference gradients for `python -m porting trace --backward`, from the reference libraries' own autograd.

    .venv-dev/bin/python tools/make_reference_gradients.py

Each case loads a tiny fixture checkpoint with transformers, timm or diffusers as their users load it,
runs the component's forward on the inputs of tests/fixtures/traces/<inputs>_inputs.safetensors (those
of the forward traces, tools/make_reference_traces.py, so the forward half of a backward trace is
checked against <component>_reference), draws a target shaped as the output (seed 30), takes
diffusers' DreamBooth objective `F.mse_loss(output.float(), target.float(), reduction="mean")` and calls
`loss.backward()`. Written under tests/fixtures/traces/:

    <inputs>_backward_inputs.safetensors    the forward inputs plus `target`: what `trace --backward` reads
    <case>_gradients_reference.safetensors  `loss`, then `grad:<key>` for every parameter that got a
                                            gradient, under the checkpoint file's own key (found by value,
                                            as make_reference_traces.py names modules: transformers 5 renames
                                            on loading), in the order backward finished them (post-accumulate
                                            hooks); the libraries' versions in the metadata

| case | checkpoint | reference | output |
|---|---|---|---|
| vit | vit/hf_classifier | transformers ViTForImageClassification | logits |
| vit_timm | vit/timm | timm VisionTransformer (the vit inputs and target) | logits |
| vit_backbone | vit/hf_vitmodel | transformers ViTModel (its pooler is off the path: no gradient) | last_hidden_state |
| text_encoder | clip/text_encoder | transformers CLIPTextModel (default attention) | last_hidden_state |
| unet | sd/tiny_diffusers | diffusers UNet2DConditionModel | sample |
| vae_encoder | sd/tiny_diffusers | diffusers AutoencoderKL: quant_conv(encoder(x)), the moments | moments |
| vae_decoder | sd/tiny_diffusers | diffusers AutoencoderKL.decode | sample |

The models run in eval mode (every fixture's dropout is 0, so train mode gives the same numbers). The
single file sd/tiny_single.safetensors holds the diffusers folder's tensors bit for bit (make_reference_sd.py
proves it with diffusers' from_single_file), so its gradients are the unet and vae cases' ones; the test
pairs its keys with the folder's by value. Together 2.0 MB, 1.2 MB of it the UNet's (one fp32 gradient per
weight is the least a per-tensor proof can store). Written by porting/trace.py's `write_trace`: regenerating leaves every file
byte-identical.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference_traces import FIXTURES, OUT, file_keys  # noqa: E402  (it puts the repository on sys.path)
from common.state_dict import write_safetensors  # noqa: E402
from porting.trace import first_tensor, write_trace  # noqa: E402  (the package's own writer, as for the traces)

SEED = 30   # issue 30


def gradients(model: torch.nn.Module, run, file: Path, target: torch.Tensor | None, g: torch.Generator
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(loss, {grad:<file key>: gradient} in backward order, target); target drawn when None."""
    names = file_keys(model, file)
    model.eval().requires_grad_(True)
    done = []
    handles = [p.register_post_accumulate_grad_hook(lambda p, name=name: done.append(name))
               for name, p in model.named_parameters()]
    output = first_tensor(run())
    if target is None:
        target = torch.randn(output.shape, generator=g)
    loss = torch.nn.functional.mse_loss(output.float(), target.float(), reduction="mean")
    loss.backward()
    for h in handles:
        h.remove()
    params = dict(model.named_parameters())
    assert all(params[n].grad is not None for n in done)
    return loss.detach(), {"grad:" + names[n]: params[n].grad.detach().clone() for n in done}, target


def write(case: str, inputs_case: str, loss: torch.Tensor, grads: dict[str, torch.Tensor], source: str,
          library: str, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """inputs: the forward inputs plus target, written when the case is the first to use them."""
    from importlib.metadata import version
    if inputs is not None:
        write_safetensors(OUT / f"{inputs_case}_backward_inputs.safetensors", {k: v.contiguous() for k, v in inputs.items()})
    write_trace(OUT / f"{case}_gradients_reference.safetensors", {"loss": loss, **grads},
                {"made_by": "tools/make_reference_gradients.py", "model": source, "inputs": inputs_case,
                 "loss": 'F.mse_loss(output.float(), target.float(), reduction="mean")',
                 "versions": f"{library} {version(library)}, torch {torch.__version__}"})
    size = sum(v.numel() * v.element_size() for v in grads.values())
    print(f"{case}: loss {loss.item():.6f}, {len(grads)} gradients, {size / 1024:.0f} KiB")


def main() -> None:
    import timm
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, ViTForImageClassification, ViTModel

    g = torch.Generator().manual_seed(SEED)
    read = lambda name: load_file(str(OUT / f"{name}_inputs.safetensors"))

    path = FIXTURES / "vit" / "hf_classifier"
    vit = ViTForImageClassification.from_pretrained(str(path))
    x = read("vit")
    loss, grads, target = gradients(vit, lambda: vit(**x), path / "model.safetensors", None, g)
    write("vit", "vit", loss, grads, "tests/fixtures/vit/hf_classifier", "transformers", {**x, "target": target})

    path = FIXTURES / "vit" / "timm"    # built as tools/make_reference_vit.py built it
    config = json.loads((path / "config.json").read_text())
    tm = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"],
                           **config["model_args"])
    tm.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    loss, grads, _ = gradients(tm, lambda: tm(x["pixel_values"]), path / "model.safetensors", target, g)
    write("vit_timm", "vit", loss, grads, "tests/fixtures/vit/timm", "timm")

    path = FIXTURES / "vit" / "hf_vitmodel"
    backbone = ViTModel.from_pretrained(str(path))
    x = {"pixel_values": x["pixel_values"][:1].clone()}
    loss, grads, target = gradients(backbone, lambda: backbone(**x), path / "model.safetensors", None, g)
    write("vit_backbone", "vit_backbone", loss, grads, "tests/fixtures/vit/hf_vitmodel", "transformers",
          {**x, "target": target})

    path = FIXTURES / "clip" / "text_encoder"
    clip = CLIPTextModel.from_pretrained(str(path))
    x = read("text_encoder")
    loss, grads, target = gradients(clip, lambda: clip(**x), path / "model.safetensors", None, g)
    write("text_encoder", "text_encoder", loss, grads, "tests/fixtures/clip/text_encoder", "transformers",
          {**x, "target": target})

    sd = FIXTURES / "sd" / "tiny_diffusers"
    unet = UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    x = read("unet")
    loss, grads, target = gradients(unet, lambda: unet(x["sample"], x["timestep"], x["encoder_hidden_states"]),
                                    sd / "unet" / "diffusion_pytorch_model.safetensors", None, g)
    write("unet", "unet", loss, grads, "tests/fixtures/sd/tiny_diffusers", "diffusers", {**x, "target": target})

    file = sd / "vae" / "diffusion_pytorch_model.safetensors"
    vae = AutoencoderKL.from_pretrained(str(sd / "vae"))
    x = read("vae_encoder")
    loss, grads, target = gradients(vae, lambda: vae.quant_conv(vae.encoder(x["pixel_values"])), file, None, g)
    write("vae_encoder", "vae_encoder", loss, grads, "tests/fixtures/sd/tiny_diffusers", "diffusers",
          {**x, "target": target})
    vae.zero_grad(set_to_none=True)
    x = read("vae_decoder")
    loss, grads, target = gradients(vae, lambda: vae.decode(x["latents"]), file, None, g)
    write("vae_decoder", "vae_decoder", loss, grads, "tests/fixtures/sd/tiny_diffusers", "diffusers",
          {**x, "target": target})


if __name__ == "__main__":
    main()
