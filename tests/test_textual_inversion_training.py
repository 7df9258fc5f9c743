"""train_textual_inversion.py: its step against diffusers' examples/textual_inversion/textual_inversion.py on the
same examples and draws (tests/fixtures/training/textual_inversion*, made by tools/make_reference_textual_inversion.py),
and the run itself: outputs, exact resume, data parallel, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_textual_inversion as ti
from clip.textual_inversion import read_embedding, vector_tokens
from common.state_dict import read_safetensors
from common.training import Distributed, adamw, finish_step, grad_scaler, learning_rate
from diffusion.pipeline import encode_prompts
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from dreambooth.inversion import (NewRows, TEMPLATE_SETS, add_placeholder, load_square_image, make_examples,
                                  to_pixels, train_new_rows)
from dreambooth.steps import Draws, denoising_loss, denoising_prediction, load_models

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "tests" / "fixtures" / "training"
TINY_SD = TRAINING / "tiny_sd"
SD = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
REFERENCE = json.loads((TRAINING / "textual_inversion.json").read_text())
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def made_with() -> str:
    v = REFERENCE["versions"]
    return (f"(fixture made with torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
            f"accelerate {v['accelerate']}; here torch {torch.__version__})")


def case_argv(flags: dict, data: Path, out: Path) -> list[str]:
    """train_textual_inversion.py's command line for a case's flags (the rest: the script's defaults)."""
    argv = ["--pretrained_model_name_or_path", str(TINY_SD), "--train_data_dir", str(data), "--output_dir", str(out),
            "--placeholder_token", flags["placeholder_token"], "--initializer_token", flags["initializer_token"],
            "--learnable_property", flags["learnable_property"], "--num_vectors", str(flags["num_vectors"]),
            "--train_batch_size", str(flags["train_batch_size"]), "--resolution", str(REFERENCE["resolution"]),
            "--gradient_accumulation_steps", str(flags["gradient_accumulation_steps"]),
            "--learning_rate", str(flags["learning_rate"]), "--lr_scheduler", flags["lr_scheduler"],
            "--lr_warmup_steps", str(flags["lr_warmup_steps"]), "--max_train_steps", str(REFERENCE["steps"])]
    return argv + ["--center_crop"] * flags["center_crop"]


def run_case(name: str, tmp_path: Path) -> tuple[dict, dict]:
    """train_textual_inversion.py's set-up and loop body for the fixture's steps, line for line but for the
    examples' picks and the draws (the reference's, given through make_examples' `choices` and `Draws`).
    Returns what the fixture records, under the same names."""
    reference, tensors = REFERENCE["cases"][name], read_safetensors(TRAINING / f"textual_inversion_{name}.safetensors")
    flags = reference["flags"]
    data = tmp_path / "photos"
    data.mkdir()
    for i, photo in enumerate(tensors["photos"].numpy()):
        Image.fromarray(photo).save(data / f"{i}.png")
    args = ti.build_parser().parse_args(case_argv(flags, data, tmp_path / "out"))
    B, accumulation, steps = args.train_batch_size, args.gradient_accumulation_steps, REFERENCE["steps"]
    # -- prepare_models, with the case's prediction type --
    models, _ = load_models(str(TINY_SD), config_dir=None, resolution=args.resolution, device=CPU, precision="fp32")
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict({**models.scheduler_config,
                                                               "prediction_type": flags["prediction_type"]}))
    ids = add_placeholder(models, args.placeholder_token, num_vectors=args.num_vectors,
                          initializer=args.initializer_token)
    assert ids == reference["placeholder_ids"], made_with()
    rows = train_new_rows(models, first=ids[0], gradient_checkpointing=False, precision="fp32")
    images = [load_square_image(f, args.resolution, center_crop=args.center_crop, flag="--train_data_dir")
              for f in sorted(data.iterdir())]
    optimizer = adamw([rows.rows], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scaler = grad_scaler(CPU, "fp32")
    placeholder = " ".join(vector_tokens(args.placeholder_token, args.num_vectors))
    assert placeholder == reference["placeholder_string"]
    out = {"loss": [], "lr": [], "tensors": {"rows.0": rows.rows.detach().clone()}}
    for step in range(steps):
        loss_sum = torch.zeros(1)
        for micro in range(accumulation):
            k = step * accumulation + micro
            choices = [(i, t, bool(f)) for i, t, f in tensors[f"{k}.choices"].tolist()]
            batch, prompts = make_examples(range(B), order=torch.arange(B), epoch=0, seed=0, images=images,
                                           templates=TEMPLATE_SETS[args.learnable_property], placeholder=placeholder,
                                           choices=choices)
            out["tensors"][f"{k}.shown"] = torch.stack([images[i].flip(-1) if f else images[i] for i, _, f in choices])
            out["tensors"][f"{k}.pixels"] = batch.pixels
            out["tensors"][f"{k}.input_ids"] = models.tokenizer(prompts, padding=True, max_length=77)
            draws = Draws(posterior=tensors[f"{k}.posterior"], noise=tensors[f"{k}.noise"],
                          timesteps=tensors[f"{k}.timesteps"])
            # -- the loop's micro-batch, as in train_textual_inversion.py's main --
            states = encode_prompts(models.text_encoder, models.tokenizer, prompts, CPU)
            pred, target, _ = denoising_prediction(models.unet, models.vae, schedule, batch, states, precision="fp32",
                                                   offset_noise=False, draws=draws)
            loss = denoising_loss(pred, target)
            scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
            out["loss"].append(loss.item())
        out["tensors"][f"grad.{step + 1}"] = rows.rows.grad.detach().clone()
        # -- the loop's optimizer step --
        lr = learning_rate(step, total=steps, peak=args.learning_rate, schedule=args.lr_scheduler,
                           warmup=args.lr_warmup_steps)
        finish_step(loss_sum, names=("loss",), micro_batches=accumulation, step=step, skipped=0, lr=lr,
                    dist=Distributed(), optimizer=optimizer, scaler=scaler, params=[rows.rows], max_grad_norm=0,
                    skip_nonfinite=False)
        out["lr"].append(lr)
        out["tensors"][f"rows.{step + 1}"] = rows.rows.detach().clone()
    return out, tensors


@pytest.mark.parametrize("name", REFERENCE["cases"])
def test_textual_inversion_step_equals_diffusers_script(name, tmp_path):
    """The photos made into the script's examples (crop, bicubic resize, flip, [-1, 1]: equal to the bit), the
    prompts' token ids equal, the loss within 1e-6 relative, the new rows' gradient within 1e-5 of its largest
    element, and the rows after each AdamW step (the script's after its restore of every other row) within 1e-6."""
    ours, tensors = run_case(name, tmp_path)
    reference = REFERENCE["cases"][name]
    for key in tensors:
        if key.endswith((".shown", ".input_ids")):
            assert torch.equal(ours["tensors"][key], tensors[key]), (key, made_with())
        if key.endswith(".shown"):
            pixels = ours["tensors"][key.replace("shown", "pixels")]
            assert torch.equal(pixels, to_pixels(tensors[key])), key
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours["loss"], reference["loss"], strict=True))
    assert worst <= 1e-6, (worst, made_with())
    assert ours["lr"] == pytest.approx(reference["lr"], rel=1e-12), made_with()
    for step in range(1, REFERENCE["steps"] + 1):
        grad, ref = ours["tensors"][f"grad.{step}"], tensors[f"grad.{step}"]
        assert (grad - ref).abs().max() <= 1e-5 * ref.abs().max(), (step, (grad - ref).abs().max(), made_with())
    for step in range(REFERENCE["steps"] + 1):
        rows, ref = ours["tensors"][f"rows.{step}"], tensors[f"rows.{step}"]
        assert (rows - ref).abs().max() <= 1e-6, (step, (rows - ref).abs().max(), made_with())


# ---- the run ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three photos of different sizes (resizing and --center_crop are exercised)."""
    root = tmp_path_factory.mktemp("ti_photos")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 24), (24, 18), (16, 16)]):
        base = rng.integers(0, 255, (1, 1, 3))
        Image.fromarray(np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)).save(
            root / f"photo{i}.png")
    return root


def argv_for(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(SD), "--train_data_dir", str(photos), "--output_dir", str(out),
            "--placeholder_token", "<ti>", "--initializer_token", "a", "--num_vectors", "2", "--resolution", "16",
            "--train_batch_size", "2", "--repeats", "2", "--learning_rate", "5e-3", "--lr_warmup_steps", "0",
            "--device", "cpu", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory) -> Path:
    """4 steps, a checkpoint every 2 (the newest kept), an embedding every 2, a validation grid at step 4."""
    out = tmp_path_factory.mktemp("ti") / "run"
    assert ti.main(argv_for(photos, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                            "--checkpoints_total_limit", "1", "--save_steps", "2", "--validation_prompt",
                            "a <ti> on a table", "--validation_steps", "4", "--num_validation_images", "2")) == 0
    return out


def test_outputs_are_diffusers_embeddings_and_a_run_record(trained):
    files = sorted(p.name for p in trained.iterdir())
    assert files == ["checkpoint-4.pt", "learned_embeds-steps-2.safetensors", "learned_embeds.safetensors",
                     "metrics.jsonl", "run_config.toml", "run_info.json", "validation"]
    e = read_embedding(trained / "learned_embeds.safetensors")
    assert e.token == "<ti>" and e.vectors.shape == (2, 32) and e.format == "diffusers"
    assert read_safetensors(trained / "learned_embeds.safetensors").keys() == {"<ti>"}
    assert [r["step"] for r in metrics(trained)] == [1, 2, 3, 4]
    assert json.loads((trained / "run_info.json").read_text())["status"] == "finished"
    assert (trained / "validation" / "step-000004.png").is_file()
    # the rows moved away from their start, the initializer's row ("a"), each its own way
    start = load_models(str(SD), config_dir=None, resolution=16, device=CPU, precision="fp32")[0]
    initial = start.text_encoder.token_embedding.weight[start.tokenizer(["a"], padding=False)[0][1]]
    assert all((row - initial).abs().max() > 1e-3 for row in e.vectors)


def test_only_the_new_rows_learn_and_the_lookup_is_the_embedding_s():
    """NewRows looks up what the grown nn.Embedding does, bit for bit; a backward gives the new rows a
    gradient and nothing else one (the frozen rows, the rest of the text encoder, the UNet, the VAE)."""
    models, _ = load_models(str(SD), config_dir=None, resolution=16, device=CPU, precision="fp32")
    ids = add_placeholder(models, "<ti>", num_vectors=3, initializer="a")
    assert ids == [1014, 1015, 1016] and models.tokenizer.added_tokens == {"<ti>": 1014, "<ti>_1": 1015, "<ti>_2": 1016}
    grown = models.text_encoder.token_embedding
    assert torch.equal(grown.weight[1014], grown.weight[models.tokenizer(["a"], padding=False)[0][1]])
    prompt = models.tokenizer(["a photo of a <ti> <ti>_1 <ti>_2"], padding=True, max_length=77)
    with torch.no_grad():
        before = models.text_encoder(prompt).last_hidden_state
    rows = train_new_rows(models, first=ids[0], gradient_checkpointing=True, precision="fp32")
    assert isinstance(models.text_encoder.token_embedding, NewRows) and rows.rows.shape == (3, 32)
    states = models.text_encoder(prompt).last_hidden_state
    assert torch.equal(states.detach(), before)
    x = torch.randn(1, 4, 4, 4)
    models.unet(x, torch.tensor([10]), states).square().mean().backward()
    trained = [n for m in (models.unet, models.vae, models.text_encoder) for n, p in m.named_parameters()
               if p.grad is not None]
    assert trained == ["token_embedding.rows"] and rows.rows.grad.abs().sum() > 0


def test_templates_of_the_user_replace_the_property_s_set(photos, tmp_path, monkeypatch):
    """--template (repeatable): the prompts are made from those templates alone, the word's tokens put in."""
    import dreambooth.inversion as inversion
    seen = []
    make = inversion.make_examples

    def spy(*args, **kwargs):
        batch, prompts = make(*args, **kwargs)
        seen.extend(prompts)
        return batch, prompts
    monkeypatch.setattr(ti, "make_examples", spy)
    assert ti.main(argv_for(photos, tmp_path / "out", "--max_train_steps", "3", "--template", "a {} on a table",
                            "--template", "{}")) == 0
    assert set(seen) == {"a <ti> <ti>_1 on a table", "<ti> <ti>_1"}


def test_resume_and_run_config_repeat_bit_for_bit(photos, tmp_path, capsys):
    full, resumed, repeated = tmp_path / "full", tmp_path / "resumed", tmp_path / "repeated"
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "cosine", "--center_crop",
             "--learnable_property", "style", "--gradient_accumulation_steps", "2", "--train_batch_size", "1"]
    assert ti.main(argv_for(photos, full, *extra)) == 0
    resumed.mkdir()
    import shutil
    shutil.copy(full / "checkpoint-2.pt", resumed / "checkpoint-2.pt")   # as if the run had stopped there
    assert ti.main(argv_for(photos, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    assert ti.main(["--config", str(full / "run_config.toml"), "--output_dir", str(repeated)]) == 0
    base = (full / "learned_embeds.safetensors").read_bytes()
    assert (resumed / "learned_embeds.safetensors").read_bytes() == base
    assert (repeated / "learned_embeds.safetensors").read_bytes() == base
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(full)][2:]   # steps 3 and 4
    capsys.readouterr()
    assert ti.main(argv_for(photos, resumed, *extra, "--learning_rate", "0.01", "--resume_from_checkpoint",
                            "latest")) == 2
    assert "learning_rate: checkpoint 0.005, now 0.01" in capsys.readouterr().err


def test_cache_latents_and_bf16_train_and_resume_bit_for_bit(photos, tmp_path):
    """--cache_latents (each photo and its mirror image encoded once) and --mixed_precision bf16 (the frozen UNet
    and VAE stored in bf16, the rows in fp32): a resumed run ends on the same bytes."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--cache_latents", "--mixed_precision", "bf16",
             "--gradient_checkpointing"]
    assert ti.main(argv_for(photos, full, *extra)) == 0
    resumed.mkdir()
    import shutil
    shutil.copy(full / "checkpoint-2.pt", resumed / "checkpoint-2.pt")
    assert ti.main(argv_for(photos, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    assert (full / "learned_embeds.safetensors").read_bytes() == (resumed / "learned_embeds.safetensors").read_bytes()
    vectors = read_safetensors(full / "learned_embeds.safetensors")["<ti>"]
    assert vectors.dtype == torch.float32 and bool(torch.isfinite(vectors).all())


def test_ddp_two_processes_equal_one_process(photos, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_train_steps", "2"]
    assert ti.main(argv_for(photos, one, *common)) == 0                                    # batch 2
    argv = argv_for(photos, two, *common, "--train_batch_size", "1")                       # batch 1 on each process
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_textual_inversion.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2
    for r1, r2 in zip(metrics(one), metrics(two), strict=True):
        assert abs(r1["loss"] - r2["loss"]) <= 1e-5
    w1 = read_safetensors(one / "learned_embeds.safetensors")["<ti>"]
    w2 = read_safetensors(two / "learned_embeds.safetensors")["<ti>"]
    assert (w1 - w2).abs().max() <= 1e-6


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("dreambooth.steps.load_models", refuse)
    monkeypatch.setattr(ti, "load_models", refuse)


def test_bad_input_is_refused_by_name_before_any_model_loads(photos, tmp_path, capsys, no_model_load):
    def run(*extra, data: Path = photos) -> str:
        try:
            code = ti.main(argv_for(data, tmp_path / "out", *extra))
        except SystemExit as e:     # argparse's parser.error: usage, then one line
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, err
        return err.splitlines()[-1]

    # the initializer must be one token of the model's tokenizer ("toy" is two in the tiny one), as the script asks
    assert run("--initializer_token", "toy") == ("error: --initializer_token 'toy': the tokenizer makes 2 tokens of it "
                                                 "(['to', 'y</w>']); it must be one (a common word such as 'toy' or "
                                                 "'dog')")
    assert "--initializer_token ' ': the tokenizer makes 0 tokens" in run("--initializer_token", " ")
    # the placeholder must be new to the tokenizer (diffusers' script refuses it too), each of its vectors' tokens
    assert "--placeholder_token 'a': 'a' is already in the tokenizer's vocabulary" in run("--placeholder_token", "a")
    assert "'the</w>' is already in" in run("--placeholder_token", "the</w>", "--num_vectors", "1")
    assert "--placeholder_token ' x': it is empty or has spaces" in run("--placeholder_token", " x")
    assert "--placeholder_token is required" in run("--placeholder_token", "")
    (tmp_path / "empty").mkdir()
    assert "--train_data_dir" in (err := run(data=tmp_path / "empty")) and "no images" in err
    assert "--resolution=20: must be a positive multiple" in run("--resolution", "20")
    assert "--num_vectors 0: must be at least 1" in run("--num_vectors", "0")
    assert "--template 'a photo': must hold {} once" in run("--template", "a photo")
    assert "--template '{} and {}': must hold {} once" in run("--template", "a {}", "--template", "{} and {}")
    assert not (tmp_path / "out").exists()


# ---- train_dreambooth.py --embedding: DreamBooth on top of an embedding ----------------------------------------
TI = ROOT / "tests" / "fixtures" / "textual_inversion"


def dreambooth_argv(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(SD), "--instance_data_dir", str(photos), "--output_dir", str(out),
            "--instance_prompt", "a photo of <multi> dog", "--resolution", "16", "--train_batch_size", "1",
            "--learning_rate", "1e-3", "--max_train_steps", "2", "--device", "cpu",
            "--embedding", str(TI / "multi.safetensors"), *extra]


def test_dreambooth_trains_on_top_of_an_embedding_and_saves_its_trained_rows(photos, tmp_path, capsys):
    """With --embedding the prompt's word is the embedding's three vectors (the first step's loss differs from a run
    without it, where <multi> is BPE pieces); with --train_text_encoder the rows train with the text encoder and
    are written to OUTPUT_DIR/embeddings/ (the saved text encoder keeps its own 1014 rows); a resumed run ends on
    the same weights."""
    import shutil

    import train_dreambooth
    out, plain, resumed = tmp_path / "out", tmp_path / "plain", tmp_path / "resumed"
    extra = ["--train_text_encoder", "--checkpointing_steps", "1"]
    assert train_dreambooth.main(dreambooth_argv(photos, out, *extra)) == 0
    assert f"--embedding {out / 'embeddings' / 'multi.safetensors'}" in capsys.readouterr().out
    argv = dreambooth_argv(photos, plain, *extra)
    assert train_dreambooth.main(argv[:argv.index("--embedding")]) == 0
    assert metrics(out)[0]["loss"] != metrics(plain)[0]["loss"]
    saved = read_safetensors(out / "text_encoder" / "model.safetensors")
    assert saved["text_model.embeddings.token_embedding.weight"].shape == (1014, 32)
    e = read_embedding(out / "embeddings" / "multi.safetensors")
    original = read_embedding(TI / "multi.safetensors")
    assert e.token == "<multi>" and e.vectors.shape == (3, 32) and not torch.equal(e.vectors, original.vectors)
    resumed.mkdir()
    shutil.copy(out / "checkpoint-1.pt", resumed / "checkpoint-1.pt")
    assert train_dreambooth.main(dreambooth_argv(photos, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    assert (resumed / "embeddings" / "multi.safetensors").read_bytes() == (out / "embeddings" / "multi.safetensors").read_bytes()
    assert (resumed / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    import sample
    written = sample.main(["--ckpt", str(out), "--embedding", str(out / "embeddings" / "multi.safetensors"), "--prompt",
                           "a photo of <multi> dog", "--n_samples", "1", "--ddim_steps", "2", "--H", "32", "--W", "32",
                           "--outdir", str(tmp_path / "samples")])
    assert written[0].is_file()


def test_dreambooth_lora_on_an_embedding_names_it_for_sampling_and_bad_ones_are_refused(photos, tmp_path, capsys):
    import train_dreambooth
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of <multi>", "--num_class_images", "1",
             "--class_data_dir", str(tmp_path / "class"), "--sample_batch_size", "1"]
    assert train_dreambooth.main(dreambooth_argv(photos, tmp_path / "lora", "--rank", "2", *prior)) == 0
    assert f"--embedding {TI / 'multi.safetensors'}" in capsys.readouterr().out
    # the class image was made with the word's three vectors: sample.py's image of the class prompt, same seed
    import sample
    written = sample.main(["--ckpt", str(SD), "--embedding", str(TI / "multi.safetensors"), "--prompt",
                           "a photo of <multi>", "--n_samples", "1", "--H", "16", "--W", "16", "--seed", "0",
                           "--outdir", str(tmp_path / "samples")])
    assert np.array_equal(np.asarray(Image.open(written[0])), np.asarray(Image.open(tmp_path / "class" / "class-00000.png")))
    argv = dreambooth_argv(photos, tmp_path / "bad", "--embedding", f"{TI / 'one.safetensors'}:a")
    assert train_dreambooth.main(argv) == 2
    assert "error: --embedding " in (err := capsys.readouterr().err) and "one.safetensors: the token 'a' is already" in err
    argv = dreambooth_argv(photos, tmp_path / "bad2", "--embedding", str(tmp_path / "missing.pt"))
    assert train_dreambooth.main(argv) == 2
    assert "--embedding " in (err := capsys.readouterr().err) and "missing.pt: no such file" in err
    assert not (tmp_path / "bad" / "unet").exists()


def test_example_config_reads_with_diffusers_readme_settings():
    from common.run_config import parse_args_with_config
    args = parse_args_with_config(ti.build_parser(),
                                  ["--config", str(ROOT / "configs" / "train_textual_inversion.example.toml")])
    assert (args.learning_rate, args.scale_lr, args.gradient_accumulation_steps, args.max_train_steps) == \
        (5e-4, True, 4, 3000)
    assert args.placeholder_token == "<cat-toy>" and args.initializer_token == "toy"
