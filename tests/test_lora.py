"""LoRA (diffusion/lora.py, diffusion/checkpoints/lora_files.py) against diffusers + peft.

tools/make_reference_lora.py wrote tiny LoRA files for the tiny SD fixture in every key format we read
(peft lora_A/lora_B with alphas in the metadata, train_dreambooth_lora.py's lora.down/up, the old
attention-processor keys with no prefix, kohya with alpha != rank and conv LoRA), one that OUR
train_dreambooth.py trained (diffusers loaded it with no missing or unexpected key: reference.json), and
diffusers' outputs with each: UNet eps and text states with the adapter (ours within 1e-4), and images
after load_lora_weights + fuse_lora(lora_scale=s) for two scales (sample.py --lora within 2/255).
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sample
import train_dreambooth
from common.state_dict import CheckpointError, read_safetensors
from diffusion import lora
from diffusion.checkpoints.load import load_stable_diffusion
from diffusion.checkpoints.lora_files import apply_lora, load_lora_files, read_lora

ROOT = Path(__file__).resolve().parent.parent
SD = ROOT / "tests" / "fixtures" / "sd"
FOLDER, SINGLE = SD / "tiny_diffusers", SD / "tiny_single.safetensors"
LORA = ROOT / "tests" / "fixtures" / "lora"
FILES = {"peft": LORA / "peft.safetensors", "diffusers": LORA / "diffusers.safetensors",
         "processors": LORA / "processors.safetensors", "kohya": LORA / "kohya.safetensors",
         "trained": LORA / "trained" / "pytorch_lora_weights.safetensors"}
REF = read_safetensors(LORA / "reference.safetensors")
META = json.loads((LORA / "reference.json").read_text())
MAX_DIFF = 2   # out of 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return load_stable_diffusion(FOLDER)


def fresh():
    return load_stable_diffusion(FOLDER)


def outputs(models, name):
    with torch.no_grad():
        eps = models.unet(REF[f"{name}.unet.sample"], REF[f"{name}.unet.t"], REF[f"{name}.unet.context"])
        states = models.text_encoder(REF[f"{name}.text.ids"]).last_hidden_state
    return eps, states


@pytest.mark.parametrize("name", FILES)
def test_adapter_outputs_equal_diffusers(name):
    models = fresh()
    updates, skipped = read_lora(FILES[name], models)
    assert not skipped
    assert len(updates) == sum(META["files"][name]["adapted_modules"].values())
    apply_lora(models, updates)                        # unfused, scale 1, as diffusers' adapter
    eps, states = outputs(models, name)
    assert (eps - REF[f"{name}.unet.eps"]).abs().max() <= 1e-4
    assert (states - REF[f"{name}.text.states"]).abs().max() <= 1e-4


def test_the_trained_lora_loaded_in_diffusers_with_every_key():
    check = META["trained_check"]
    assert check["warnings"] == [] and "no missing or unexpected key" in check["check"]
    assert check["adapted_modules"] == {"unet": 48, "text_encoder": 8}


def _argv(out: Path, *extra: str, layout: str = "folder") -> list[str]:
    run = META["run"]
    ckpt = ["--ckpt", str(FOLDER)] if layout == "folder" else ["--ckpt", str(SINGLE), "--config", str(FOLDER)]
    return [*ckpt, "--outdir", str(out), "--prompt", run["prompt"], "--n_samples", "1",
            "--ddim_steps", str(run["num_inference_steps"]), "--scale", str(run["guidance_scale"]),
            "--H", str(run["height"]), "--W", str(run["width"]), "--seed", str(run["seed"]), "--device", "cpu",
            *extra]


def _assert_image(path: Path, reference: torch.Tensor, what: str) -> None:
    ours = np.asarray(Image.open(path)).astype(int)
    diff = np.abs(ours - reference[0].numpy().astype(int)).max()
    assert diff <= MAX_DIFF, f"{what}: max |diff| {diff}/255 > {MAX_DIFF}/255"


@pytest.mark.parametrize("layout", ["folder", "single_file"])
@pytest.mark.parametrize("scale", META["scales"])
@pytest.mark.parametrize("name", FILES)
def test_sample_py_lora_images_equal_diffusers_fuse_lora(name, scale, layout, tmp_path, capsys):
    written = sample.main(_argv(tmp_path, "--lora", f"{FILES[name]}:{scale}", layout=layout))
    _assert_image(written[0], REF[f"{name}.image.{scale}"], f"{name} at {scale} ({layout})")


def test_unfused_gives_the_fused_images(tmp_path):
    written = sample.main(_argv(tmp_path, "--lora", f"{FILES['kohya']}:0.6", "--lora_unfused"))
    _assert_image(written[0], REF["kohya.image.0.6"], "kohya at 0.6, unfused")


def test_fuse_equals_unfused_and_remove_restores_the_base(base):
    x, t, c = REF["peft.unet.sample"], REF["peft.unet.t"], REF["peft.unet.context"]
    models = fresh()
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    updates, _ = read_lora(FILES["kohya"], models)      # includes 3x3 and 1x1 conv updates
    apply_lora(models, updates, scale=0.7)
    with torch.no_grad():
        unfused = models.unet(x, t, c)
    assert lora.remove(models.unet) == sum(u.part == "unet" for u in updates)
    assert all(torch.equal(v, before[k]) for k, v in models.unet.state_dict().items())
    apply_lora(models, updates, scale=0.7)
    lora.fuse(models.unet)
    assert set(models.unet.state_dict()) == set(before), "fusing leaves a plain model"
    with torch.no_grad():
        assert (models.unet(x, t, c) - unfused).abs().max() <= 1e-4


def test_kohya_alpha_per_module_is_eq_3(tmp_path):
    """A different alpha per module (A1111 and kohya apply each its own; see the tool on diffusers)."""
    models = fresh()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n, alpha in ((name, 1.0), (other, 8.0)):
        W = models.unet.get_submodule(n).weight
        flat = "lora_unet_" + n.replace(".", "_")
        sd[f"{flat}.lora_down.weight"] = torch.randn(4, W.shape[1], generator=g)
        sd[f"{flat}.lora_up.weight"] = torch.randn(W.shape[0], 4, generator=g)
        sd[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(tmp_path / "k.safetensors"))
    want = {n: models.unet.get_submodule(n).weight + 0.5 * a / 4 * (sd[f"lora_unet_{n.replace('.', '_')}.lora_up.weight"]
            @ sd[f"lora_unet_{n.replace('.', '_')}.lora_down.weight"]) for n, a in ((name, 1.0), (other, 8.0))}
    load_lora_files(models, [(str(tmp_path / "k.safetensors"), 0.5)])
    for n, w in want.items():
        assert torch.allclose(models.unet.get_submodule(n).weight, w, atol=1e-6)


# ---- bad input --------------------------------------------------------------------------------------
def test_unknown_key_is_named_or_skipped_and_printed(tmp_path, capsys):
    sd = read_safetensors(FILES["diffusers"])
    sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.lora.down.weight"] = torch.zeros(3, 16)
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 key\(s\) match no module.*attn1\.to_x\.lora\.down\.weight"):
        read_lora(tmp_path / "x.safetensors", fresh())
    sample.main(_argv(tmp_path / "out", "--lora", str(tmp_path / "x.safetensors"), "--lora_skip_unknown"))
    err = capsys.readouterr().err
    assert "--lora_skip_unknown: skipped" in err and "attn1.to_x.lora.down.weight" in err


def test_sdxl_shaped_lora_is_refused_before_sampling_naming_key_and_shapes(tmp_path, monkeypatch):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    sd = {key: torch.randn(4, 2048), key.replace("lora_A", "lora_B"): torch.randn(32, 4)}
    save_file(sd, str(tmp_path / "sdxl.safetensors"))
    monkeypatch.setattr("diffusion.pipeline.generate", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit, match=r"--lora .*attn2\.to_k\.lora_A\.weight has shape \(4, 2048\).*"
                                         r"Linear weight \(32, 32\)\) needs \(4, 32\)"):
        sample.main(_argv(tmp_path, "--lora", str(tmp_path / "sdxl.safetensors")))


def test_pickle_lora_and_bad_scale_are_refused(tmp_path):
    torch.save({}, tmp_path / "lora.bin")
    with pytest.raises(SystemExit, match=r"--lora .*lora\.bin: pickle checkpoints \(\.bin\) are refused"):
        sample.main(_argv(tmp_path, "--lora", str(tmp_path / "lora.bin")))
    with pytest.raises(SystemExit, match=r"--lora .*:abc: the scale 'abc' is not a number"):
        sample.main(_argv(tmp_path, "--lora", f"{FILES['kohya']}:abc"))


@pytest.mark.parametrize("rank", ["0", "-2"])
def test_rank_below_one_is_refused_by_name(rank, capsys):
    with pytest.raises(SystemExit):
        train_dreambooth.main(["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", ".",
                               "--instance_prompt", "x", "--rank", rank])
    assert f"--rank {rank}: the LoRA rank must be at least 1" in capsys.readouterr().err


def test_trainable_parameters_are_the_lora_updates_only():
    from dreambooth.steps import trainable_parameters
    models = fresh()
    params = trainable_parameters(models, train_text_encoder=True, gradient_checkpointing=False, rank=4)
    lora_params = [p for part in (models.unet, models.text_encoder) for n, p in part.named_parameters()
                   if ".lora_" in n]
    assert len(params) == len(lora_params) == 2 * (48 + 8)
    assert {id(p) for p in params} == {id(p) for p in lora_params}
    frozen = [n for m in (models.unet, models.text_encoder, models.vae) for n, p in m.named_parameters()
              if p.requires_grad and ".lora_" not in n]
    assert not frozen


def test_lora_training_stores_the_frozen_weights_in_bf16_and_the_updates_in_fp32():
    """As train_dreambooth_lora.py's weight_dtype: with --mixed_precision bf16 the frozen UNet, VAE and
    text encoder are bf16; the LoRA updates (all that trains) stay fp32 for AdamW."""
    from dreambooth.steps import trainable_parameters
    models = fresh()
    params = trainable_parameters(models, train_text_encoder=True, gradient_checkpointing=False, rank=4,
                                  precision="bf16")
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = {n: p.dtype for part in ("unet", "text_encoder", "vae")
              for n, p in getattr(models, part).named_parameters(prefix=part) if ".lora_" not in n}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert models.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight.dtype \
        == torch.bfloat16


# ---- training -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora_data")
    (root / "instance").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(root / "instance" / f"{i}.png")
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", str(data / "instance"),
            "--instance_prompt", "a photo of sks dog", "--resolution", "16", "--train_batch_size", "1",
            "--device", "cpu", "--rank", "2", "--train_text_encoder", "--output_dir", str(out), *extra]


def test_lora_training_moves_only_the_update_and_resumes_exactly(data, tmp_path):
    full = tmp_path / "full"
    assert train_dreambooth.main(train_args(data, full, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                            "--lora_format", "kohya")) == 0
    # --rank without --learning_rate: train_dreambooth_lora.py's default, 5e-4
    assert tomllib.loads((full / "run_config.toml").read_text())["learning_rate"] == 5e-4
    written = read_safetensors(full / "pytorch_lora_weights.safetensors")
    assert len(written) == 2 * (48 + 8) and all(".lora" in k for k in written)
    assert (full / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert not (full / "unet").exists(), "a LoRA run writes the LoRA only"
    # resume from step 2 in a copy: the same LoRA as the uninterrupted run
    part = tmp_path / "part"
    part.mkdir()
    (part / "checkpoint-2.pt").write_bytes((full / "checkpoint-2.pt").read_bytes())
    assert train_dreambooth.main(train_args(data, part, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                            "--lora_format", "kohya", "--resume_from_checkpoint", "latest")) == 0
    again = read_safetensors(part / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(written[k], again[k]) for k in written)
    # only the update moved: the trained LoRA applied to the base changes outputs, and the base is the base
    models = fresh()
    updates, _ = read_lora(full / "pytorch_lora_weights.safetensors", models)
    assert any(u.up.abs().max() > 0 for u in updates), "B starts at zero and must have trained"
    kohya, _ = read_lora(full / "pytorch_lora_weights_kohya.safetensors", fresh())
    assert {(u.part, u.module) for u in kohya} == {(u.part, u.module) for u in updates}


# ---- training on top of a LoRA-fused base (train_dreambooth.py --lora) ---------------------------------
def base_args(data: Path, out: Path, *extra: str, model: Path = FOLDER) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data / "instance"),
            "--instance_prompt", "a photo of sks dog", "--resolution", "16", "--train_batch_size", "1",
            "--device", "cpu", "--max_train_steps", "2", "--output_dir", str(out), *extra]


def test_training_with_lora_equals_training_the_base_fused_by_hand(data, tmp_path):
    """--lora FILE:0.6 fuses the file (kohya: UNet, text encoder and conv updates) into the base before
    training: the same UNet as training a folder that holds that fused model, and not the plain base's."""
    from diffusion.checkpoints.save import save_diffusers_folder
    by_hand = fresh()
    load_lora_files(by_hand, [(str(FILES["kohya"]), 0.6)])
    save_diffusers_folder(by_hand, tmp_path / "fused", trained={"unet", "text_encoder"})
    runs = {"flag": base_args(data, tmp_path / "flag", "--lora", f"{FILES['kohya']}:0.6"),
            "by_hand": base_args(data, tmp_path / "by_hand", model=tmp_path / "fused"),
            "plain": base_args(data, tmp_path / "plain")}
    for argv in runs.values():
        assert train_dreambooth.main(argv) == 0
    unet = {name: read_safetensors(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors") for name in runs}
    assert max((unet["flag"][k] - unet["by_hand"][k]).abs().max().item() for k in unet["flag"]) <= 1e-5
    assert max((unet["flag"][k] - unet["plain"][k]).abs().max().item() for k in unet["flag"]) > 1e-3
    # the text encoder was not trained, but the LoRA changed it: written fused, not copied from the input
    text = {name: read_safetensors(tmp_path / name / "text_encoder" / "model.safetensors") for name in ("flag", "fused")}
    assert all(torch.equal(text["flag"][k], text["fused"][k]) for k in text["fused"])
    assert tomllib.loads((tmp_path / "flag" / "run_config.toml").read_text())["lora"] == [f"{FILES['kohya']}:0.6"]


@pytest.mark.parametrize("generation_precision", [None, "bf16"])
def test_class_images_come_from_the_lora_fused_base(generation_precision, data, tmp_path, monkeypatch):
    """The class images are the fused base's, also from the copy made in --prior_generation_precision."""
    seen, make = [], train_dreambooth.generate_class_images
    def spy(models, *args, **kwargs):
        seen.append({part: {k: v.clone() for k, v in getattr(models, part).state_dict().items()}
                     for part in ("unet", "text_encoder")})
        return make(models, *args, **kwargs)
    monkeypatch.setattr(train_dreambooth, "generate_class_images", spy)
    extra = ["--prior_generation_precision", generation_precision] if generation_precision else []
    assert train_dreambooth.main(base_args(
        data, tmp_path / "out", "--lora", f"{FILES['kohya']}:0.6", "--with_prior_preservation", "--class_prompt",
        "a photo of dog", "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "2",
        "--max_train_steps", "1", *extra)) == 0
    dtype = torch.bfloat16 if generation_precision else torch.float32
    by_hand = load_stable_diffusion(FOLDER, dtype=dtype)
    load_lora_files(by_hand, [(str(FILES["kohya"]), 0.6)])
    (weights,) = seen
    for part in ("unet", "text_encoder"):
        for k, v in getattr(by_hand, part).state_dict().items():
            assert torch.equal(weights[part][k], v), (part, k)


def test_lora_training_on_a_lora_fused_base_resumes_exactly(data, tmp_path):
    """The fused base is made again from the same --lora flags on resume: the same LoRA as one run."""
    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--lora", f"{FILES['peft']}:0.5")
    full = tmp_path / "full"
    assert train_dreambooth.main(train_args(data, full, *extra)) == 0
    part = tmp_path / "part"
    part.mkdir()
    (part / "checkpoint-2.pt").write_bytes((full / "checkpoint-2.pt").read_bytes())
    assert train_dreambooth.main(train_args(data, part, *extra, "--resume_from_checkpoint", "latest")) == 0
    written, again = (read_safetensors(f / "pytorch_lora_weights.safetensors") for f in (full, part))
    assert all(torch.equal(written[k], again[k]) for k in written)


def test_bad_lora_flags_and_files_are_refused_before_training(data, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        train_dreambooth.main(base_args(data, tmp_path / "a", "--lora", f"{FILES['kohya']}:abc"))
    assert f"--lora {FILES['kohya']}:abc: the scale 'abc' is not a number" in capsys.readouterr().err
    # an SDXL-shaped file, and one with a key that maps onto no module: named, before any training step
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    save_file({key: torch.randn(4, 2048), key.replace("lora_A", "lora_B"): torch.randn(32, 4)},
              str(tmp_path / "sdxl.safetensors"))
    unknown = read_safetensors(FILES["diffusers"])
    unknown["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.lora.down.weight"] = torch.zeros(3, 16)
    save_file(unknown, str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(train_dreambooth, "trainable_parameters", lambda *a, **k: pytest.fail("trained"))
    assert train_dreambooth.main(base_args(data, tmp_path / "b", "--lora", str(tmp_path / "sdxl.safetensors"))) == 2
    assert re.search(r"error: --lora .*sdxl\.safetensors: .*attn2\.to_k\.lora_A\.weight has shape \(4, 2048\)",
                     capsys.readouterr().err)
    assert train_dreambooth.main(base_args(data, tmp_path / "c", "--lora", str(tmp_path / "x.safetensors"))) == 2
    assert "attn1.to_x.lora.down.weight (--lora_skip_unknown skips them)" in capsys.readouterr().err
    monkeypatch.undo()
    assert train_dreambooth.main(base_args(data, tmp_path / "d", "--lora", str(tmp_path / "x.safetensors"),
                                           "--lora_skip_unknown", "--max_train_steps", "1")) == 0
    assert "--lora_skip_unknown: skipped" in capsys.readouterr().err


def test_bf16_lora_training_trains_writes_fp32_and_resumes_exactly(data, tmp_path):
    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--mixed_precision", "bf16")
    full = tmp_path / "full"
    assert train_dreambooth.main(train_args(data, full, *extra)) == 0
    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss is not None and np.isfinite(loss) for loss in losses)
    written = read_safetensors(full / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float32}
    assert all(v.abs().max() > 0 for k, v in written.items() if ".up." in k), "B starts at zero and must train"
    part = tmp_path / "part"
    part.mkdir()
    (part / "checkpoint-2.pt").write_bytes((full / "checkpoint-2.pt").read_bytes())
    assert train_dreambooth.main(train_args(data, part, *extra, "--resume_from_checkpoint", "latest")) == 0
    again = read_safetensors(part / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(written[k], again[k]) for k in written)


def test_bf16_lora_training_reads_the_frozen_base_in_bf16(data, tmp_path, monkeypatch):
    """No fp32 copy of the base on the way to a bf16 LoRA run: the loader is asked for bf16 weights
    (and the run is the one that casting an fp32 load would give); with --lora files to fuse, fp32 first."""
    asked = []
    load = train_dreambooth.load_models
    monkeypatch.setattr(train_dreambooth, "load_models", lambda *a, **kw: asked.append(kw["dtype"]) or load(*a, **kw))
    extra = ("--max_train_steps", "2", "--mixed_precision", "bf16")
    assert train_dreambooth.main(train_args(data, tmp_path / "direct", *extra)) == 0
    assert asked == [torch.bfloat16]
    direct = read_safetensors(tmp_path / "direct" / "pytorch_lora_weights.safetensors")

    def fp32_then_cast(*a, **kw):   # the old path: fp32 from the file, cast by trainable_parameters
        asked.append(kw["dtype"])
        return load(*a, **{**kw, "dtype": torch.float32})
    monkeypatch.setattr(train_dreambooth, "load_models", fp32_then_cast)
    assert train_dreambooth.main(train_args(data, tmp_path / "cast", *extra)) == 0
    cast = read_safetensors(tmp_path / "cast" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(direct[k], cast[k]) for k in direct)
