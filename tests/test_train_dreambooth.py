"""train_dreambooth.py on the tiny SD fixtures: the loss falls, what must stay frozen stays bit-identical,
exact resume, DDP = one process, class images deterministic and resumable, outputs that load (and keep
the input's key layout), the saver's key tables on the real SD v1 manifests, and bad input refused
before any model is loaded. Every run is a few steps at 16x16 pixels (4x4 latents)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import train_dreambooth
from common.state_dict import read_safetensors
from common.training import list_checkpoints, load_checkpoint
from diffusion.speed import arrange_for_speed
from dreambooth.data import generate_class_images, missing_class_indices
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from diffusion.checkpoints.load import load_stable_diffusion

ROOT = Path(__file__).resolve().parent.parent
SD = ROOT / "tests" / "fixtures" / "sd"
FOLDER, SINGLE = SD / "tiny_diffusers", SD / "tiny_single.safetensors"
MANIFESTS = ROOT / "tests" / "manifests"
FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
         "text_encoder": "model.safetensors"}
PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three instance photos (different sizes, so resizing and cropping are exercised)."""
    root = tmp_path_factory.mktemp("dreambooth_data")
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    for i, (h, w) in enumerate([(20, 24), (24, 18), (16, 16)]):
        base = rng.integers(0, 255, (1, 1, 3))        # one colour per photo, plus a little texture
        pixels = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "instance" / f"photo{i}.png")
    return root


def args_for(data: Path, out: Path, *extra: str, model: Path = FOLDER) -> list[str]:
    config = ["--pretrained_config_dir", str(FOLDER)] if model == SINGLE else []
    return ["--pretrained_model_name_or_path", str(model), *config, "--instance_data_dir", str(data / "instance"),
            "--instance_prompt", PROMPT, "--resolution", "16", "--train_batch_size", "1", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", "--checkpointing_steps", "100", "--device", "cpu",
            "--output_dir", str(out), *extra]


PRIOR = ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--num_class_images", "3",
         "--sample_batch_size", "2"]


def prior(data: Path) -> list[str]:
    return [*PRIOR, "--class_data_dir", str(data / "class")]


def tensors(folder: Path, part: str) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / part / FILES[part])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """The main run: folder model, prior preservation (class images generated), 8 steps, a checkpoint
    every 4 (only the newest kept), a validation grid at step 4 and 8, and the single file."""
    out = tmp_path_factory.mktemp("trained") / "sks"
    argv = args_for(data, out, *prior(data), "--max_train_steps", "8", "--checkpointing_steps", "4",
                    "--checkpoints_total_limit", "1", "--validation_prompt", "a sks dog", "--validation_steps", "4",
                    "--num_validation_images", "2", "--save_single_file")
    assert train_dreambooth.main(argv) == 0
    return out


# ---- training -------------------------------------------------------------------------------------------
def fixed_instance_loss(model_path: Path, data: Path) -> float:
    """The epsilon loss on the instance photos (centre crops) over 8 fixed noise/timestep draws each."""
    from dreambooth.data import crop, load_image
    models = load_stable_diffusion(model_path)
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(models.scheduler_config))
    g = torch.Generator().manual_seed(0)
    images = [crop(load_image(f, 16), 16, center=True, generator=g)[0] for f in sorted((data / "instance").iterdir())]
    pixels = torch.stack(images).repeat(8, 1, 1, 1)                                  # (24, 3, 16, 16)
    with torch.no_grad():
        latents = models.vae.encode(pixels).mean * models.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(latents),), generator=g)
        ids = models.tokenizer([PROMPT] * len(latents), padding=True, max_length=77)
        pred = models.unet(schedule.add_noise(latents, noise, t), t, models.text_encoder(ids).last_hidden_state)
    return F.mse_loss(pred, noise).item()


def test_instance_loss_falls_and_metrics_are_logged(trained, data):
    assert fixed_instance_loss(trained, data) < 0.9 * fixed_instance_loss(FOLDER, data)
    records = metrics(trained)
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("instance_loss", "prior_loss", "lr", "step_time_s", "peak_memory_mb", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert sorted(p.name for p in (trained / "validation").iterdir()) == ["step-000004.png", "step-000008.png"]
    assert [step for step, _ in list_checkpoints(trained)] == [8]            # --checkpoints_total_limit 1
    assert (trained / "run_config.toml").is_file()
    assert json.loads((trained / "run_info.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in (data / "class").iterdir()) == ["class-00000.png", "class-00001.png",
                                                                  "class-00002.png"]


def test_frozen_parts_are_written_as_they_came(trained):
    for part in ("vae", "text_encoder"):                       # no --train_text_encoder
        assert (trained / part / FILES[part]).read_bytes() == (FOLDER / part / FILES[part]).read_bytes(), part
    ours, base = tensors(trained, "unet"), tensors(FOLDER, "unet")
    assert ours.keys() == base.keys()                          # the input's key layout
    assert any(not torch.equal(ours[k], base[k]) for k in ours)


def test_output_folder_samples_with_sample_py(trained, tmp_path):
    written = sample.main(["--ckpt", str(trained), "--prompt", "a sks dog", "--n_samples", "1", "--ddim_steps", "2",
                           "--H", "16", "--W", "16", "--outdir", str(tmp_path)])
    assert len(written) == 2 and all(p.is_file() for p in written)


def test_single_file_holds_the_same_weights(trained):
    single = trained / "sks.safetensors"
    file = read_safetensors(single)
    assert all(v.dtype == torch.float16 for v in file.values())
    reference = read_safetensors(SINGLE)      # the same model in the original layout, as published
    model_keys = {k for k in reference if k.startswith(("model.diffusion_model.", "first_stage_model.",
                                                         "cond_stage_model."))} - {
        "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert set(file) == model_keys
    a, b = load_stable_diffusion(single, config_dir=FOLDER), load_stable_diffusion(trained)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k].half().float()) for k in sb), name


def test_text_encoder_trains_only_when_asked(data, tmp_path):
    out = tmp_path / "te"
    assert train_dreambooth.main(args_for(data, out, "--train_text_encoder", "--gradient_checkpointing",
                                          "--max_train_steps", "2")) == 0
    ours, base = tensors(out, "text_encoder"), tensors(FOLDER, "text_encoder")
    assert ours.keys() == base.keys()
    assert any(not torch.equal(ours[k], base[k]) for k in ours if not k.endswith("position_ids"))
    assert (out / "vae" / FILES["vae"]).read_bytes() == (FOLDER / "vae" / FILES["vae"]).read_bytes()


def test_resume_and_run_config_repeat_bit_for_bit(data, tmp_path, capsys):
    full, resumed, repeated = tmp_path / "full", tmp_path / "resumed", tmp_path / "repeated"
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--offset_noise", "--snr_gamma", "5.0",
             "--lr_scheduler", "linear", "--lr_warmup_steps", "1"]
    assert train_dreambooth.main(args_for(data, full, *extra)) == 0
    resumed.mkdir()
    shutil.copy(full / "checkpoint-2.pt", resumed / "checkpoint-2.pt")   # as if the run had stopped there
    assert train_dreambooth.main(args_for(data, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    assert train_dreambooth.main(["--config", str(full / "run_config.toml"), "--output_dir", str(repeated)]) == 0
    base = tensors(full, "unet")
    for other in (resumed, repeated):
        ours = tensors(other, "unet")
        assert all(torch.equal(base[k], ours[k]) for k in base), other.name
    assert load_checkpoint(full / "checkpoint-4.pt")["step"] == 4
    # a run-shaping change is refused, naming it
    capsys.readouterr()
    assert train_dreambooth.main(args_for(data, resumed, *extra, "--learning_rate", "0.01",
                                          "--resume_from_checkpoint", "latest")) == 2
    assert "learning_rate: checkpoint 0.001, now 0.01" in capsys.readouterr().err


def test_bf16_on_cpu_trains_channels_last_and_resumes_bit_for_bit(data, tmp_path):
    """bf16 on a CPU stores the UNet and VAE channels-last (diffusion/speed.py): the run says so, the
    saved weights are ordinary tensors that load back, and a resumed run ends bit for bit equal."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--mixed_precision", "bf16",
             "--gradient_checkpointing"]
    assert train_dreambooth.main(args_for(data, full, *extra)) == 0
    info = json.loads((full / "run_info.json").read_text())
    assert info["memory_format"] == {"unet": "channels_last", "vae": "channels_last"} and info["dtype"] == "bf16"
    resumed.mkdir()
    shutil.copy(full / "checkpoint-2.pt", resumed / "checkpoint-2.pt")
    assert train_dreambooth.main(args_for(data, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    base, again = tensors(full, "unet"), tensors(resumed, "unet")
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not torch.equal(base["conv_in.weight"], tensors(FOLDER, "unet")["conv_in.weight"])  # it trained
    assert load_stable_diffusion(full).unet.conv_in.weight.is_contiguous()


def test_ddp_two_processes_equal_one_process(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # each run generates its own class images (the 2 processes share the work): the same files
    common = [*PRIOR, "--max_train_steps", "2", "--learning_rate", "1e-4", "--train_text_encoder"]
    assert train_dreambooth.main(args_for(data, one, *common, "--class_data_dir", str(tmp_path / "class1"),
                                          "--train_batch_size", "2")) == 0
    argv = args_for(data, two, *common, "--class_data_dir", str(tmp_path / "class2"))   # batch 1 on each process
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_dreambooth.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "class1").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "class2").iterdir()}
    for r1, r2 in zip(metrics(one), metrics(two)):
        assert abs(r1["instance_loss"] - r2["instance_loss"]) <= 1e-5 and abs(r1["prior_loss"] - r2["prior_loss"]) <= 1e-5
    for part in ("unet", "text_encoder"):
        w1, w2 = tensors(one, part), tensors(two, part)
        worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        assert worst <= 1e-5, (part, worst)


def test_cache_latents_is_close_to_encoding_every_step_and_resumes_bit_for_bit(data, tmp_path):
    """--cache_latents: the same run within the encoder's batching noise (each crop encoded alone
    instead of in its batch), and a resumed cached run bit for bit. The instance photos are larger than
    the resolution, so random crops (one cache entry per distinct offset) are exercised."""
    plain, cached, resumed = tmp_path / "plain", tmp_path / "cached", tmp_path / "resumed"
    extra = [*prior(data), "--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "2",
             "--train_text_encoder"]
    assert train_dreambooth.main(args_for(data, plain, *extra)) == 0
    assert train_dreambooth.main(args_for(data, cached, *extra, "--cache_latents")) == 0
    resumed.mkdir()
    shutil.copy(cached / "checkpoint-2.pt", resumed / "checkpoint-2.pt")
    assert train_dreambooth.main(args_for(data, resumed, *extra, "--cache_latents",
                                          "--resume_from_checkpoint", "latest")) == 0
    assert [r["instance_loss"] for r in metrics(cached)] == pytest.approx(
        [r["instance_loss"] for r in metrics(plain)], rel=1e-4)
    for part in ("unet", "text_encoder"):
        a, b, c = tensors(plain, part), tensors(cached, part), tensors(resumed, part)
        assert all(torch.equal(b[k], c[k]) for k in b), part
        # fp32's 1e-4: AdamW moves a weight whose gradient is near 0 by about the learning rate (1e-3) whatever
        # the gradient's size, so 1e-6 in the latents can show as a few 1e-5 in such a weight after 4 steps
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-4, (part, worst)


def test_latent_cache_encodes_each_crop_once(data):
    """Rows that are the same crop are encoded once, alone; the posterior keeps the batch's row order."""
    from dreambooth.steps import Batch, LatentCache
    vae = load_stable_diffusion(FOLDER).vae
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    crops = [("instance", 0, 0, 0), ("instance", 1, 2, 0), ("class", 0, 0, 0)]
    cache = LatentCache(vae, "fp32")
    first = cache.posterior(Batch(pixels=pixels, generators=[None] * 3, crops=crops))
    again = cache.posterior(Batch(pixels=pixels[[2, 0]], generators=[None] * 2, crops=[crops[2], crops[0]]))
    assert calls == [1, 1, 1]                                  # three crops, each encoded once and alone
    with torch.no_grad():
        alone = torch.cat([encode(pixels[i:i + 1]).moments for i in range(3)])
    assert torch.equal(first.moments, alone) and torch.equal(again.moments, alone[[2, 0]])


def test_v_prediction_target_with_min_snr(data, tmp_path):
    model = tmp_path / "v_model"
    shutil.copytree(FOLDER, model)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    out = tmp_path / "v"
    assert train_dreambooth.main(args_for(data, out, "--max_train_steps", "2", "--snr_gamma", "5.0",
                                          model=model)) == 0
    assert all(np.isfinite(r["instance_loss"]) for r in metrics(out))


def test_single_file_model_in_and_out_keeps_its_layout(data, tmp_path):
    out = tmp_path / "from_single"
    assert train_dreambooth.main(args_for(data, out, "--max_train_steps", "1", "--save_single_file",
                                          model=SINGLE)) == 0
    written, source = read_safetensors(out / "from_single.safetensors"), read_safetensors(SINGLE)
    assert written.keys() == source.keys()                     # schedule buffers and position_ids included
    assert all(torch.equal(written[k], source[k].half()) for k in source if not k.startswith("model.diffusion"))
    models = load_stable_diffusion(out)                        # and the folder made from it loads
    assert models.layout == "diffusers"


# ---- class images ------------------------------------------------------------------------------------------
def test_class_images_are_deterministic_and_resumable(tmp_path):
    models = load_stable_diffusion(FOLDER)
    make = lambda folder, indices: generate_class_images(
        models, folder, indices, prompt=CLASS_PROMPT, resolution=16, seed=3, batch_size=2, steps=4,
        guidance_scale=7.5, progress=False)
    first = tmp_path / "first"
    assert [p.name for p in make(first, missing_class_indices(first, 3))] == [
        "class-00000.png", "class-00001.png", "class-00002.png"]
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    (first / "class-00001.png").unlink()
    Image.new("RGB", (16, 16)).save(first / "my-photo.jpg")     # a user's own image counts too
    assert missing_class_indices(first, 4) == [1]
    assert missing_class_indices(first, 3) == []
    make(first, [1])
    assert (first / "class-00001.png").read_bytes() == before["class-00001.png"]
    second = tmp_path / "second"                                # another folder, another order: same images
    make(second, [2, 0])
    assert {p.name: p.read_bytes() for p in second.iterdir()} == {k: before[k] for k in ("class-00000.png",
                                                                                         "class-00002.png")}
    assert before["class-00000.png"] != before["class-00002.png"]
    plms = tmp_path / "plms"                                    # --plms: PLMS makes them, deterministically too
    generate_class_images(models, plms, [0], prompt=CLASS_PROMPT, resolution=16, seed=3, batch_size=2, steps=4,
                          guidance_scale=7.5, progress=False, sampler="plms")
    assert (plms / "class-00000.png").read_bytes() != before["class-00000.png"]


@pytest.mark.parametrize("flag, dtype", [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_class_images_come_in_prior_generation_precision(flag, dtype, data, tmp_path, monkeypatch):
    """As diffusers: class images from the base model with its weights in --prior_generation_precision's
    dtype (default fp32 on a CPU), the training models staying fp32."""
    seen, make = [], train_dreambooth.generate_class_images
    def spy(models, *args, **kwargs):
        seen.append({p.dtype for p in models.unet.parameters()})
        return make(models, *args, **kwargs)
    monkeypatch.setattr(train_dreambooth, "generate_class_images", spy)
    extra = ["--prior_generation_precision", flag] if flag else []
    argv = args_for(data, tmp_path / "out", *PRIOR, "--class_data_dir", str(tmp_path / "class"),
                    "--max_train_steps", "1", *extra)
    assert train_dreambooth.main(argv) == 0
    assert seen == [{dtype}]
    expected, base = tmp_path / "expected", load_stable_diffusion(FOLDER, dtype=dtype)
    arrange_for_speed(base, device=torch.device("cpu"), precision=flag or "fp32")    # as the script runs it
    generate_class_images(base, expected, [0, 1, 2], prompt=CLASS_PROMPT,
                          resolution=16, seed=0, batch_size=2, steps=50, guidance_scale=7.5, progress=False)
    for path in sorted(expected.iterdir()):
        assert (tmp_path / "class" / path.name).read_bytes() == path.read_bytes(), path.name
    assert {p.dtype for p in load_stable_diffusion(tmp_path / "out").unet.parameters()} == {torch.float32}


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("diffusion.checkpoints.load.load_stable_diffusion", refuse)


def test_bad_input_is_refused_before_any_model_loads(data, tmp_path, capsys, no_model_load):
    def run(*argv, instance: Path = data / "instance"):
        argv = args_for(data, tmp_path / "out", *argv)
        argv[argv.index("--instance_data_dir") + 1] = str(instance)
        try:
            code = train_dreambooth.main(argv)
        except SystemExit as e:     # argparse's parser.error
            code = e.code
        return code, capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    code, err = run(instance=tmp_path / "empty")
    assert code == 2 and "--instance_data_dir" in err and "no images" in err
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("not a photo")
    code, err = run(instance=tmp_path / "mixed")
    assert code == 2 and "notes.txt is not a readable image" in err
    code, err = run("--with_prior_preservation", "--class_data_dir", str(tmp_path / "c"))
    assert code == 2 and "--with_prior_preservation needs --class_prompt" in err
    code, err = run("--resolution", "20")
    assert code == 2 and "--resolution=20: must be a positive multiple of 8" in err
    (tmp_path / "a_file").write_text("")
    argv = args_for(data, tmp_path / "a_file" / "out")
    assert train_dreambooth.main(argv) == 2
    assert "--output_dir" in (err := capsys.readouterr().err) and "cannot write there" in err


# ---- the saver's key tables on the real SD v1 layouts -------------------------------------------------------
def test_saver_writes_the_real_sd_v1_key_layouts():
    """Our SD v1 models (meta device) written back through the key tables read backwards give exactly the
    published files' tensor names and shapes (the single file without its schedule buffers and position_ids)."""
    from clip.text_model import CLIPTextConfig, CLIPTextModel
    from diffusion.checkpoints import single_file
    from clip.weights import FOLDER_PREFIX, SINGLE_FILE_PREFIX, text_table
    from diffusion.checkpoints.save import _vae_attention_as_conv, to_layout
    from diffusion.models.unet import UNet2DConditionModel, UNetConfig
    from diffusion.models.vae import AutoencoderKL, VAEConfig
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(config=UNetConfig.sd_v1()), AutoencoderKL(config=VAEConfig.sd_v1())
        text = CLIPTextModel(CLIPTextConfig.vit_l14())
    shapes = lambda d: {k: list(v.shape) for k, v in d.items()}
    single = {**to_layout(unet.state_dict(), single_file.unet_table(unet.config), what="unet"),
              **to_layout(_vae_attention_as_conv(vae.state_dict()), single_file.vae_table(vae.config), what="vae"),
              **to_layout(text.state_dict(), text_table(SINGLE_FILE_PREFIX), what="text")}
    published = json.loads((MANIFESTS / "sd_v1_single_file.json").read_text())["model_tensors"]
    published.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert shapes(single) == published
    folder_text = to_layout(text.state_dict(), text_table(FOLDER_PREFIX), what="text")
    files = json.loads((MANIFESTS / "sd_v1_diffusers.json").read_text())["files"]
    expected = {k: v for k, v in files["text_encoder/model.safetensors"].items() if not k.endswith("position_ids")}
    assert shapes(folder_text) == expected
    assert shapes(unet.state_dict()) == files["unet/diffusion_pytorch_model.safetensors"]
    from common.state_dict import CheckpointError
    with pytest.raises(CheckpointError, match=r"unet: the key table does not write and read back extra\.weight"):
        to_layout({**unet.state_dict(), "extra.weight": torch.zeros(1)}, single_file.unet_table(unet.config), what="unet")


def test_single_file_with_config_dir_takes_its_tokenizer():
    models = load_stable_diffusion(SINGLE, config_dir=FOLDER)
    assert models.tokenizer.vocab == load_stable_diffusion(FOLDER).tokenizer.vocab
    assert len(models.tokenizer.vocab) < 49408          # not the shipped SD v1 vocabulary


def test_example_config_reads_with_the_seed_repository_settings():
    from common.run_config import parse_args_with_config
    args = parse_args_with_config(train_dreambooth.build_parser(),
                                  ["--config", str(ROOT / "configs" / "train_dreambooth.example.toml")])
    assert (args.learning_rate, args.max_train_steps, args.train_batch_size, args.prior_loss_weight) == (1e-6, 800, 1, 1.0)


def test_truncated_huge_and_eps_instance_images_are_refused_before_any_model_loads(data, tmp_path, capsys,
                                                                                   no_model_load):
    """Image.verify() passed a truncated PNG, and training crashed after the models had loaded."""
    import io as io_
    from PIL import Image
    cases = {}
    buf = io_.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    cases["truncated.png"] = (buf.getvalue()[:-40], "truncated")
    buf = io_.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")          # 10^8 pixels in a few KB
    cases["huge.png"] = (buf.getvalue(), "too large")
    cases["drawing.eps"] = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS")
    for name, (payload, why) in cases.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_bytes(payload)
        argv = args_for(data, tmp_path / "out")
        argv[argv.index("--instance_data_dir") + 1] = str(folder)
        assert train_dreambooth.main(argv) == 2
        err = capsys.readouterr().err
        assert "--instance_data_dir" in err and name in err and why in err, err


@pytest.mark.parametrize("w, h, size", [(17, 23, (16, 21)), (23, 17, (21, 16)), (16, 16, (16, 16)), (40, 20, (32, 16))])
def test_images_resize_as_torchvision_resize(w, h, size, tmp_path):
    """diffusers' DreamBooth scripts resize with torchvision's Resize(resolution): the longer side
    int(resolution * long / short), truncated. Rounding gave 17 x 23 -> 16 x 22, and a centre crop a pixel off."""
    from dreambooth.data import load_image
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "x.png")
    assert tuple(load_image(tmp_path / "x.png", 16).shape) == (3, size[1], size[0])
