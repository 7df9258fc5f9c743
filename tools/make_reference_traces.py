"""Dev-only: layer-by-layer reference traces from transformers, timm and diffusers on the tiny fixtures.

    .venv-dev/bin/python tools/make_reference_traces.py

Hooks every module of transformers' ViTForImageClassification, CLIPTextModel and
CLIPVisionModelWithProjection, timm's VisionTransformer and diffusers' UNet2DConditionModel and
AutoencoderKL (encoder + quant_conv, post_quant_conv + decoder) that holds a tensor, runs each on fixed
inputs, and writes under tests/fixtures/traces/:

    <component>_inputs.safetensors          the inputs, by the names `python -m porting trace` takes
    <component>_reference.safetensors       each module's output (the first tensor of a tuple or output
                                            object), fp32, keyed by the module's name relative to the
                                            component, the forward order in the metadata
    vit_timm_reference.safetensors          timm's ViT (tests/fixtures/vit/timm) on the vit inputs, under
                                            timm's module names (`blocks.1.attn.qkv`, `patch_embed.proj`)
    <component>_bf16_reference.safetensors  text_encoder and unet with their weights in bf16, as a user
                                            with dtype=torch.bfloat16 runs them, stored in bf16; the
                                            metadata's `cpu` names the kind of CPU that made them
                                            (common/precision.cpu_kind)
    bf16_digests.json                       {cpu kind: {bf16 trace: {module: sha256}}} (porting/compare
                                            `digest`), one entry per kind of CPU this was run on

bf16 results depend on the CPU's kernels (emulated bf16 on AVX2, native on AVX512-BF16, AMX), so a bf16
trace is reproducible only on its own kind. Run on a CPU of another kind,

    .venv-dev/bin/python tools/make_reference_traces.py --bf16_digests_only

records that kind's digests and leaves every trace file as it was: the test then asks bit-identity on
each recorded kind, and 3e-2 of the trace file elsewhere.

transformers 5 renames modules on loading (ViT's `encoder.layer.N.attention.attention.query` lives as
`layers.N.attention.q_proj`; CLIPTextModel drops `text_model.`), so its live names are not the file's.
Every hooked module is therefore named by the file: its tensors are found in the checkpoint file by
value, and the module takes the name of the file's module holding exactly those tensors (innermost
first where several nest). Live modules with no such file module (transformers 5's ViT `mlp`) are
left out; so are the file's wrappers that no live module has any more (`attention.attention`).
timm and diffusers keep the file's names as module names, so theirs are used as they are.

The tests trace our models on the same inputs (`python -m porting trace`) and hold every layer to
1e-4 of the reference's largest magnitude (fp32), or to the bf16 trace bit for bit (bf16). The
checkpoints are the committed tiny fixtures (tools/make_reference_sd.py, make_reference_clip.py,
make_reference_vit.py, make_reference_eval.py); the inputs are small (a 8x8 latent, a 16x16 image) so that all traces
together stay near 2 MB. Files are written by porting/trace.py's `write_trace`, which makes the same
trace the same bytes: regenerating on the same kind of CPU leaves every file as it was (on another kind
the fp32 traces move by float rounding, up to 1.3e-6 of a layer measured between AVX2 and AVX512+bf16,
and the bf16 ones by up to 1.7e-2: use --bf16_digests_only).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.precision import cpu_kind  # noqa: E402
from porting.compare import digest  # noqa: E402
from porting.trace import first_tensor, write_trace  # noqa: E402  (the package's own, as ours is traced)

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "traces"


def file_keys(model: torch.nn.Module, file: Path) -> dict[str, str]:
    """live parameter name -> the checkpoint file's key, by finding each tensor in the file by value (every
    tensor of the tiny fixtures is perturbed, so each is found once)."""
    tensors = load_file(str(file))
    by_value = {}
    for key, t in tensors.items():
        by_value.setdefault((tuple(t.shape), t.float().sum().item(), t.float().abs().sum().item()), []).append(key)
    def file_key(p: torch.Tensor) -> str:
        found = [k for k in by_value.get((tuple(p.shape), p.float().sum().item(), p.float().abs().sum().item()), [])
                 if torch.equal(tensors[k].float(), p.detach().float())]
        assert len(found) == 1, f"tensor of shape {tuple(p.shape)} found {len(found)} times in {file}"
        return found[0]
    return {name: file_key(p) for name, p in model.named_parameters()}


def file_names(model: torch.nn.Module, file: Path) -> dict[str, str]:
    """live module name -> the checkpoint file's module name, by finding each tensor in the file by value."""
    tensors = load_file(str(file))
    key_of = file_keys(model, file)
    prefixes: dict[str, set] = {}
    for key in tensors:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefixes.setdefault(".".join(parts[:i]), set()).add(key)
    by_set: dict[frozenset, list[str]] = {}
    for p, keys in prefixes.items():
        if not all(k[len(p) + 1:].split(".")[0].isdigit() for k in keys):   # lists are never called
            by_set.setdefault(frozenset(keys), []).append(p)
    groups: dict[frozenset, list[str]] = {}
    for name, module in model.named_modules():
        params = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if name and params:
            groups.setdefault(frozenset(key_of[p] for p in params), []).append(name)
    out = {}
    for keys, live in groups.items():
        live = sorted(live, key=lambda n: -n.count("."))
        for name, p in zip(live, sorted(by_set.get(keys, []), key=lambda n: -n.count("."))):
            out[name] = p
    return out


def trace(model: torch.nn.Module, run, scopes: dict[str, str], file: Path | None = None,
          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """scopes: {module prefix to hook: prefix to remove from its names}; "" hooks every module but the root.
    file: name modules after this checkpoint file (transformers 5) rather than their live names.
    dtype: the weights' precision while run (named first, as the file's values identify them in fp32);
    `run` passes inputs in that precision. The outputs are kept in it."""
    names = file_names(model, file) if file is not None else None
    model.to(dtype)
    outputs = {}
    handles = []
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.parameters()):
            continue
        if names is not None and name not in names:
            continue
        for scope, strip in scopes.items():
            if scope == "" or name == scope or name.startswith(scope + "."):
                short = (names[name] if names is not None else name).removeprefix(strip)
                if short == strip.rstrip(".") and strip:
                    continue                         # the component's own top module
                def hook(mod, args, output, short=short):
                    y = first_tensor(output)
                    if y is not None:
                        outputs.pop(short, None)     # keep the forward order of the last call
                        outputs[short] = y.detach().clone().contiguous()
                handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return outputs


def record_digests(name: str, outputs: dict[str, torch.Tensor], kind: str) -> None:
    """This kind's digests of a bf16 trace into bf16_digests.json, the other kinds' entries kept."""
    path = OUT / "bf16_digests.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(kind, {})[name] = {key: digest(t) for key, t in outputs.items()}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def write(name: str, outputs: dict[str, torch.Tensor], source: str, inputs: dict[str, torch.Tensor] | None = None,
          **metadata: str) -> None:
    """inputs: None where the case reuses another's (vit_timm: vit's, the bf16 cases: the fp32 ones').
    A `cpu` in the metadata marks a trace whose bits depend on the kind of CPU: its digests are recorded."""
    OUT.mkdir(parents=True, exist_ok=True)
    if "cpu" in metadata:
        record_digests(name, outputs, metadata["cpu"])
    if "--bf16_digests_only" in sys.argv:
        return                                       # the trace files stay as another kind of CPU made them
    if inputs is not None:
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(OUT / f"{name}_inputs.safetensors"))
    write_trace(OUT / f"{name}_reference.safetensors", outputs,
                {"made_by": "tools/make_reference_traces.py", "model": source, **metadata})
    size = sum(v.numel() * v.element_size() for v in outputs.values())
    print(f"{name}: {len(outputs)} modules, {size / 1024:.0f} KiB")


def main() -> None:
    import timm
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection, ViTForImageClassification

    g = torch.Generator().manual_seed(18)
    cpu = cpu_kind()                                 # bf16 sums depend on the kernels: "AVX2", "AVX512+bf16", ...

    vit_path = FIXTURES / "vit" / "hf_classifier"
    vit = ViTForImageClassification.from_pretrained(str(vit_path), attn_implementation="eager").eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    write("vit", trace(vit, lambda: vit(**x), {"": ""}, vit_path / "model.safetensors"), "tests/fixtures/vit/hf_classifier", x)

    # timm, built as tools/make_reference_vit.py built it (its config.json's architecture and model_args)
    timm_path = FIXTURES / "vit" / "timm"
    config = json.loads((timm_path / "config.json").read_text())
    tm = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"],
                           **config["model_args"]).eval()
    tm.load_state_dict(load_file(str(timm_path / "model.safetensors")), strict=True)
    write("vit_timm", trace(tm, lambda: tm(x["pixel_values"]), {"": ""}), "tests/fixtures/vit/timm")

    clip_path = FIXTURES / "clip" / "text_encoder"
    clip = CLIPTextModel.from_pretrained(str(clip_path), attn_implementation="eager").eval()
    ids = torch.randint(0, 998, (2, 12), generator=g)
    ids[0, -1], ids[1, 7] = 999, 999                 # the end token (the vocabulary's largest id), mid-row in row 1
    x = {"input_ids": ids}
    write("text_encoder", trace(clip, lambda: clip(**x), {"": ""}, clip_path / "model.safetensors"),
          "tests/fixtures/clip/text_encoder", x)
    # bf16 with transformers' default attention (SDPA), as ours computes it. The eager path above rounds the
    # fp32 softmax to bf16 before multiplying by v: 1.2e-2 of a layer's largest value away in bf16, as far
    # as bf16 is from fp32, where in fp32 the two paths agree to 4e-7.
    # .to(bf16) after naming is what from_pretrained(dtype=torch.bfloat16) gives (no module kept in fp32).
    clip = CLIPTextModel.from_pretrained(str(clip_path)).eval()
    write("text_encoder_bf16", trace(clip, lambda: clip(**x), {"": ""}, clip_path / "model.safetensors", torch.bfloat16),
          "tests/fixtures/clip/text_encoder", cpu=cpu)

    sd = FIXTURES / "sd" / "tiny_diffusers"
    unet = UNet2DConditionModel.from_pretrained(str(sd / "unet")).eval()
    x = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([411.0]),
         "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    write("unet", trace(unet, lambda: unet(x["sample"], x["timestep"], x["encoder_hidden_states"]), {"": ""}),
          "tests/fixtures/sd/tiny_diffusers", x)
    x16 = {**x, "sample": x["sample"].bfloat16(), "encoder_hidden_states": x["encoder_hidden_states"].bfloat16()}
    write("unet_bf16", trace(unet, lambda: unet(x16["sample"], x16["timestep"], x16["encoder_hidden_states"]),
                             {"": ""}, dtype=torch.bfloat16), "tests/fixtures/sd/tiny_diffusers", cpu=cpu)

    vae = AutoencoderKL.from_pretrained(str(sd / "vae")).eval()
    x = {"pixel_values": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1}
    write("vae_encoder", trace(vae, lambda: vae.encode(x["pixel_values"]), {"encoder": "encoder.", "quant_conv": ""}),
          "tests/fixtures/sd/tiny_diffusers", x)
    x = {"latents": torch.randn(1, 4, 4, 4, generator=g)}
    write("vae_decoder", trace(vae, lambda: vae.decode(x["latents"]), {"decoder": "decoder.", "post_quant_conv": ""}),
          "tests/fixtures/sd/tiny_diffusers", x)

    # CLIP's image tower with its projection (tools/make_reference_eval.py's ViT-B/32-shaped file); its own
    # generator, so that the inputs above stay what they were
    clipv_path = FIXTURES / "clip_model" / "b32_vision"
    clipv = CLIPVisionModelWithProjection.from_pretrained(str(clipv_path), attn_implementation="eager").eval()
    x = {"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(19))}
    write("clip_vision", trace(clipv, lambda: clipv(**x), {"": ""}, clipv_path / "model.safetensors"),
          "tests/fixtures/clip_model/b32_vision", x)


if __name__ == "__main__":
    main()
