"""Issue #39, the second hardening round: each example of the issue (and of the probes that followed it) is a
one-line error naming the flag and the value, or a correct result, with nothing left behind.

1. non-finite weights never reach an image: a NaN LoRA, an infinite alpha, an absurd scale, a NaN model,
   a fused result or a computation that overflows;
2. sizes and counts are checked against the memory there is before any model work, and scoring streams;
3. bad values (steps, seeds, output folders, prompt files, devices, configs) are one line before any model
   loads, and a run that fails its checks writes no record;
4. porting's tolerance and --out (tests/test_porting.py);
5. --lora is the same flag everywhere.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import predict_emotion
import sample
import train_dreambooth
import train_emotion
import train_textual_inversion
from common.state_dict import CheckpointError, read_safetensors
from diffusion.checkpoints.load import load_stable_diffusion
from diffusion.checkpoints.lora_files import adaptable_modules, load_lora_files
from diffusion.pipeline import NonFiniteError, generate
from embedded import WORLD_SD

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FOLDER = FIXTURES / "sd" / "tiny_diffusers"
LORA = FIXTURES / "lora"
GB = 2**30

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if a script gets as far as reading a model's weights."""
    import diffusion.checkpoints.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")
    monkeypatch.setattr(diffusion.checkpoints.load, "load_stable_diffusion", refuse)


@pytest.fixture
def memory(monkeypatch):
    """The machine's available memory, set by the test (so a verdict does not depend on the machine)."""
    have = {"bytes": 8 * GB}
    monkeypatch.setattr("common.memory.available_memory", lambda device="cpu": have["bytes"])
    return have


def sample_argv(out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(FOLDER), "--outdir", str(out), "--H", "32", "--W", "32", "--n_samples", "1",
            "--ddim_steps", "2", *extra]


def refused(call, capsys, *words: str) -> str:
    """Run a script's main; it must stop with exit status 2 (or return 2) and one error line holding `words`."""
    try:
        code = call()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def nan_lora(path: Path) -> Path:
    tensors = {k: v.clone() for k, v in read_safetensors(LORA / "diffusers.safetensors").items()}
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(path))
    return path


def world_lora(path: Path, value: float) -> Path:
    """A diffusers-format LoRA for the embedded model's first attention values: every entry `value`. (Huge
    queries would not do: attention's softmax subtracts its maximum and stays finite.)"""
    models = load_stable_diffusion(WORLD_SD)
    name = next(n for n in adaptable_modules(models.unet) if n.endswith("attn1.to_v"))
    layer = models.unet.get_submodule(name)
    save_file({f"unet.{name}.lora.down.weight": torch.full((1, layer.in_features), value),
               f"unet.{name}.lora.up.weight": torch.full((layer.out_features, 1), value)}, str(path))
    return path


# ---- 1. no non-finite weights reach an image --------------------------------------------------------------
def test_a_nan_lora_is_refused_by_name_before_sampling(tmp_path, capsys):
    lora = nan_lora(tmp_path / "nan.safetensors")
    line = refused(lambda: sample.main(sample_argv(tmp_path / "out", "--lora", str(lora))), capsys,
                   "--lora", str(lora), "holds non-finite values (1 NaN")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight" in line
    assert not (tmp_path / "out").exists()


def test_an_infinite_alpha_is_refused_by_name(tmp_path, capsys):
    tensors = dict(read_safetensors(LORA / "kohya.safetensors"))
    alpha = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[alpha] = torch.tensor(float("inf"))
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    refused(lambda: sample.main(sample_argv(tmp_path / "out", "--lora", str(tmp_path / "inf.safetensors"))), capsys,
            f"tensor {alpha} holds non-finite values (0 NaN, 1 infinite")
    # an alpha in diffusers' metadata is JSON, which can say Infinity too
    sd = read_safetensors(LORA / "diffusers.safetensors")
    save_file(dict(sd), str(tmp_path / "meta.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": float("inf")})})
    refused(lambda: sample.main(sample_argv(tmp_path / "out", "--lora", str(tmp_path / "meta.safetensors"))), capsys,
            "unet.lora_alpha = inf: an alpha must be a finite number")


@pytest.mark.parametrize("scale", ["-1e30", "1e3", "nan", "inf"])
def test_an_absurd_scale_is_refused_before_any_model_loads(scale, tmp_path, capsys, no_model_work):
    refused(lambda: sample.main(sample_argv(tmp_path / "out", "--lora", f"{LORA / 'kohya.safetensors'}:{scale}")),
            capsys, f"kohya.safetensors:{scale}: the scale", "within +-100")
    assert not (tmp_path / "out").exists()


def test_a_nan_lora_under_train_dreambooth_is_named_as_the_cause(tmp_path, capsys, monkeypatch):
    lora = nan_lora(tmp_path / "nan.safetensors")
    (tmp_path / "instance").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "instance" / "0.png")
    monkeypatch.setattr(train_dreambooth, "trainable_parameters", lambda *a, **k: pytest.fail("trained"))
    line = refused(lambda: train_dreambooth.main(
        ["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", str(tmp_path / "instance"),
         "--instance_prompt", "a sks dog", "--resolution", "16", "--train_batch_size", "1", "--device", "cpu",
         "--lora", str(lora), "--output_dir", str(tmp_path / "out")]), capsys, f"--lora {lora}", "NaN")
    assert "learning_rate" not in line
    assert not (tmp_path / "out" / "run_info.json").exists()


def test_a_model_with_nan_weights_is_refused_at_load_naming_the_tensor(tmp_path):
    import shutil
    shutil.copytree(FOLDER, tmp_path / "m")
    file = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = {k: v.clone() for k, v in read_safetensors(file).items()}
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"tensor conv_in\.weight holds non-finite values \(1 NaN"):
        load_stable_diffusion(tmp_path / "m")


def test_a_fused_result_that_overflows_is_refused(tmp_path):
    """Finite file, finite scale, but B A at 1e20 x 1e20 is infinite in float32: refused once fused."""
    models = load_stable_diffusion(WORLD_SD)
    path = world_lora(tmp_path / "huge.safetensors", 1e20)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors:1 fused in: tensor unet\..*attn1\.to_v\.weight "
                                              r"holds non-finite values"):
        load_lora_files(models, [(str(path), 1.0)])


def test_a_model_that_computes_nan_gives_no_image(tmp_path, capsys):
    """Finite weights whose activations overflow (a LoRA of 1e18s: fused weights of about 1e36): no black image,
    neither from generate nor from sample.py, and the run record says it failed."""
    models = load_stable_diffusion(WORLD_SD)
    load_lora_files(models, [(str(world_lora(tmp_path / "big.safetensors", 1e18)), 1.0)])
    with pytest.raises(NonFiniteError, match="the UNet's prediction at the first step holds NaN or infinity"):
        generate(models, ["a star"], steps=2, seed=0, progress=False)
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--lora", str(tmp_path / "big.safetensors"), "--outdir", str(tmp_path / "out"),
                     "--n_samples", "1", "--ddim_steps", "2"])
    assert exit_.value.code == 1 and "holds NaN or infinity" in capsys.readouterr().err
    assert list((tmp_path / "out" / "samples").iterdir()) == []
    assert json.loads((tmp_path / "out" / "run_info.json").read_text())["status"].startswith("failed: the UNet's")


def test_scoring_a_model_that_computes_nan_writes_no_scores(tmp_path, capsys):
    import world.dreambooth_demo as demo
    lora = world_lora(tmp_path / "big.safetensors", 1e18)
    code = demo.score_main([str(WORLD_SD), "--lora", str(lora), "--out", str(tmp_path / "s"), "--steps", "2",
                            "--fidelity_seeds", "1", "--prior_seeds", "1"])
    assert code == 1 and "holds NaN or infinity" in capsys.readouterr().err
    assert not (tmp_path / "s" / "scores.json").exists()


def test_a_training_checkpoint_with_nan_weights_is_skipped_by_name(tmp_path, capsys):
    """A run stops before it would save a NaN state, so such a checkpoint is corrupt: resuming skips it as it
    skips a torn one, naming the tensor, instead of training on into 'the loss is not finite'."""
    tiny = ["--image_size", "32", "--num_synthetic_train", "48", "--num_synthetic_eval", "14", "--train_batch_size", "8",
            "--lr_warmup_steps", "2", "--device", "cpu", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "4",
            "--checkpointing_steps", "2"]
    assert train_emotion.main(tiny) == 0
    path = tmp_path / "run" / "checkpoint-4.pt"
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, path)
    capsys.readouterr()
    assert train_emotion.main([*tiny, "--resume_from_checkpoint", "latest"]) == 0
    err = capsys.readouterr().err
    assert f"skipping {path}" in err and f"tensor model.{name} holds non-finite values (1 NaN" in err
    assert "resumed from" in err and "checkpoint-2.pt" in err


# ---- 2. memory and time before work ----------------------------------------------------------------------
def test_n_samples_beyond_memory_is_refused_with_both_numbers_and_the_flags(tmp_path, capsys, memory,
                                                                            no_model_work):
    line = refused(lambda: sample.main(["--outdir", str(tmp_path / "out"), "--n_samples", "100000"]), capsys,
                   "--n_samples 100000", "of 64x64 images: needs about", "GB of memory, but the cpu has 8.0 GB "
                   "available", "lower --n_samples to", "--n_iter")
    fit = int(re.search(r"lower --n_samples to (\d+)", line)[1])
    assert 100 < fit < 100000
    assert not (tmp_path / "out").exists()


def test_a_width_beyond_memory_is_refused(tmp_path, capsys, memory, no_model_work):
    memory["bytes"] = 4 * GB
    refused(lambda: sample.main(["--outdir", str(tmp_path / "out"), "--H", "64", "--W", "100000"]), capsys,
            "of 64x100000 images: needs about", "one 64x100000 image needs about", "lower --H/--W")


def test_n_iter_beyond_memory_is_refused(tmp_path, capsys, memory, no_model_work):
    refused(lambda: sample.main(["--outdir", str(tmp_path / "out"), "--n_iter", "100000000"]), capsys,
            "--n_iter 100000000", "lower --n_iter to")


def test_sampling_memory_estimate_grows_with_the_work():
    from diffusion.checkpoints.configs import read_configs
    from diffusion.pipeline import sampling_memory
    configs = read_configs(WORLD_SD, None)
    one = sampling_memory(*configs, images=1, height=64, width=64)
    assert sampling_memory(*configs, images=10, height=64, width=64) == 10 * one
    assert sampling_memory(*configs, images=1, height=64, width=640) == 10 * one
    assert sampling_memory(*configs, images=1, height=64, width=64, guidance=False) <= one


def test_a_rank_above_the_adapted_layers_width_is_refused_before_loading(tmp_path, capsys, no_model_work):
    (tmp_path / "instance").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "instance" / "0.png")
    refused(lambda: train_dreambooth.main(
        ["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", str(tmp_path / "instance"),
         "--instance_prompt", "x", "--resolution", "16", "--rank", "100000", "--output_dir", str(tmp_path / "out")]),
        capsys, "--rank 100000: above the width of the narrowest layer it adapts", "attn1.to_q (16)",
        "choose 16 or less")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (["--resolution", "100000"], ["--resolution 100000", "instance images held in memory", "lower --resolution"]),
    (["--with_prior_preservation", "--class_prompt", "y", "--num_class_images", "1000000000"],
     ["--num_class_images 1000000000 held in memory"]),
    (["--with_prior_preservation", "--class_prompt", "y", "--num_class_images", "2",
      "--sample_batch_size", "100000000"],
     ["--sample_batch_size 100000000 class images", "lower --sample_batch_size to"]),
    (["--train_batch_size", "100000000"], ["--train_batch_size 100000000", "--gradient_checkpointing"]),
    (["--validation_prompt", "v", "--num_validation_images", "100000000"],
     ["--num_validation_images 100000000", "lower --num_validation_images to"]),
])
def test_dreambooth_sizes_beyond_memory_are_refused_before_loading(extra, words, tmp_path, capsys, memory,
                                                                    no_model_work):
    (tmp_path / "instance").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "instance" / "0.png")
    refused(lambda: train_dreambooth.main(
        ["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", str(tmp_path / "instance"),
         "--instance_prompt", "x", "--resolution", "16", "--class_data_dir", str(tmp_path / "class"),
         "--device", "cpu", "--output_dir", str(tmp_path / "out"), *extra]), capsys, "needs about", *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "class").exists()


@pytest.mark.parametrize("extra, words", [
    (["--resolution", "100000"], ["--resolution 100000", "instance images held in memory"]),
    (["--train_batch_size", "100000000"], ["--train_batch_size 100000000", "--gradient_checkpointing"]),
    (["--validation_prompt", "v", "--num_validation_images", "100000000"], ["--num_validation_images 100000000"]),
])
def test_textual_inversion_sizes_beyond_memory_are_refused_before_loading(extra, words, tmp_path, capsys, memory,
                                                                          no_model_work):
    """The same estimate as DreamBooth's, for a run with no --rank and no class images (the frozen model in the
    precision, as a LoRA run holds it)."""
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "photos" / "0.png")
    refused(lambda: train_textual_inversion.main(
        ["--pretrained_model_name_or_path", str(FOLDER), "--train_data_dir", str(tmp_path / "photos"),
         "--placeholder_token", "<new>", "--initializer_token", "star", "--resolution", "16", "--device", "cpu",
         "--output_dir", str(tmp_path / "out"), *extra]), capsys, "needs about", *words)
    assert not (tmp_path / "out").exists()


def test_scoring_streams_its_images_in_fixed_batches(monkeypatch):
    """score --fidelity_seeds 100000000 grew by 330 MB/s before its first image: every seed's starting noise
    was drawn up front. Now a batch of SCORE_BATCH images is all that exists at a time."""
    import world.dreambooth_demo as demo
    models = load_stable_diffusion(WORLD_SD)
    drawn = []
    import diffusion.pipeline as pipeline
    original = pipeline.initial_latents

    def counting(*args, **kwargs):
        drawn.append(1)
        if len(drawn) > 2 * demo.SCORE_BATCH:
            raise AssertionError("starting noise drawn for images beyond the first batch")
        return original(*args, **kwargs)
    monkeypatch.setattr(pipeline, "initial_latents", counting)
    batches = demo.sample_images(models, demo.fidelity_prompts(), 100_000_000, steps=1)
    first = next(batches)
    assert len(first) == demo.SCORE_BATCH and len(drawn) == demo.SCORE_BATCH


def test_scoring_batches_give_the_images_of_one_batch(monkeypatch):
    """Streaming keeps each image's starting noise: batches of 3 give what one batch of all gives (within
    the last bits that a batch's size can change)."""
    import world.dreambooth_demo as demo
    models = load_stable_diffusion(WORLD_SD)
    whole = [np.asarray(im, np.int16) for b in demo.sample_images(models, ["a star", "a circle"], 4, 2) for im in b]
    parts = [np.asarray(im, np.int16) for b in demo.sample_images(models, ["a star", "a circle"], 4, 2, batch=3)
             for im in b]
    assert len(whole) == len(parts) == 8
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(whole, parts))


# ---- 3. bad values: one line before any model loads, nothing left behind ----------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--ddim_steps", "100000"], ["--ddim_steps 100000: must be from 1 to 1000"]),
    (["--sampler", "dpmpp_2m", "--ddim_steps", "1001"], ["--ddim_steps 1001"]),
    (["--seed", str(2**70)], [f"--seed {2**70}: must be an integer from"]),
    (["--seed", str(2**64 - 1), "--n_iter", "2"], ["--seed + 1 seeds the last batch"]),
    (["--device", "meta"], ["--device meta: must be cpu or cuda"]),
    (["--ddim_eta", "1.5"], ["--ddim_eta 1.5: must be from 0 (deterministic DDIM) to 1 (DDPM)"]),
    (["--device", "bogus"], ["--device bogus: must be cpu or cuda"]),
])
def test_sample_bad_values_are_one_line_before_any_model_loads(extra, words, tmp_path, capsys, no_model_work):
    refused(lambda: sample.main(sample_argv(tmp_path / "out", *extra)), capsys, *words)
    assert not (tmp_path / "out").exists(), "a run that fails its checks writes no record"


def test_an_outdir_that_cannot_be_a_folder_is_named(tmp_path, capsys, no_model_work):
    (tmp_path / "file").write_text("x")
    refused(lambda: sample.main(sample_argv(tmp_path / "file")), capsys,
            f"--outdir {tmp_path / 'file'}: cannot write there: it is a file")
    refused(lambda: sample.main(sample_argv(tmp_path / "file" / "sub")), capsys,
            f"it is under {tmp_path / 'file'}, which is a file")
    if sys.platform.startswith("linux"):   # a folder no one can create, root included
        refused(lambda: sample.main(sample_argv(Path("/proc/no/such"))), capsys, "--outdir /proc/no/such: cannot write")


def test_the_output_folder_check_leaves_nothing(tmp_path):
    from common.files import check_writable
    check_writable(tmp_path / "a" / "b" / "c", "--outdir")
    assert list(tmp_path.iterdir()) == []


def _prove_many(folder: str, times: int) -> list[str]:
    from common.files import check_writable
    failures = []
    for _ in range(times):
        try:
            check_writable(folder, "--output_dir")
        except ValueError as e:
            failures.append(str(e))
    return failures


def test_processes_proving_one_folder_at_once_all_succeed(tmp_path):
    """The ranks of a DDP run prove the same --output_dir at once, each removing the folders it made: a folder
    vanishing under another's proof made it say "cannot write there (No such file or directory)" (CI saw it in
    test_train_emotion's two-process run; 4 processes x 1000 proofs here failed about 1 in 100)."""
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(4) as pool:
        failures = pool.starmap(_prove_many, [(str(tmp_path / "out" / "run"), 1000)] * 4)
    assert [f for per_process in failures for f in per_process] == []


def test_a_binary_prompt_file_is_named(tmp_path, capsys, no_model_work):
    (tmp_path / "prompts.bin").write_bytes(bytes(range(256)))
    refused(lambda: sample.main(sample_argv(tmp_path / "out", "--from-file", str(tmp_path / "prompts.bin"))), capsys,
            f"--from-file {tmp_path / 'prompts.bin'}: not a UTF-8 text file")
    refused(lambda: sample.main(sample_argv(tmp_path / "out", "--from-file", str(tmp_path))), capsys,
            f"--from-file {tmp_path}: is a folder")


def test_a_binary_run_config_is_named(tmp_path, capsys):
    (tmp_path / "run.toml").write_bytes(b"\xff\xfe\x00garbage")
    refused(lambda: sample.main(["--config", str(tmp_path / "run.toml")]), capsys,
            f"--config {tmp_path / 'run.toml'}: not a UTF-8 text file")


def test_score_out_that_cannot_be_a_folder_is_named(tmp_path, capsys, no_model_work):
    import world.dreambooth_demo as demo
    (tmp_path / "file").write_text("x")
    for out, words in ((tmp_path / "file", "it is a file"), (tmp_path / "file" / "s", "which is a file")):
        refused(lambda: demo.score_main([str(WORLD_SD), "--out", str(out)]), capsys, f"--out {out}", words)
    refused(lambda: demo.score_main([str(WORLD_SD), "--out", str(tmp_path / "s"), "--steps", "100000"]), capsys,
            "--steps 100000: must be from 1 to 1000")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_trainer_seeds_out_of_range_are_one_line(seed, tmp_path, capsys):
    refused(lambda: train_dreambooth.main(["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", ".",
                                           "--instance_prompt", "x", "--seed", seed]), capsys, f"--seed {seed}")
    refused(lambda: train_emotion.main(["--output_dir", str(tmp_path / "e"), "--seed", seed]), capsys,
            f"--seed {seed}")
    refused(lambda: train_textual_inversion.main(TEXTUAL_INVERSION + ["--output_dir", str(tmp_path / "t"), "--seed",
                                                                      seed]), capsys, f"--seed {seed}")
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()


TEXTUAL_INVERSION = ["--pretrained_model_name_or_path", str(FOLDER), "--train_data_dir", ".", "--placeholder_token",
                     "<new>", "--initializer_token", "star"]


@pytest.mark.parametrize("extra, words", [
    (["--adam_beta1", "2"], ["--adam_beta1 2.0: must be in [0, 1)"]),
    (["--adam_epsilon", "-1"], ["--adam_epsilon -1.0: must be >= 0"]),
    (["--learning_rate", "0"], ["--learning_rate 0.0: must be > 0"]),
    (["--checkpointing_steps", "0"], ["--checkpointing_steps 0: must be at least 1"]),
])
def test_textual_inversion_shares_the_trainers_flag_checks(extra, words, tmp_path, capsys, no_model_work):
    """common/training.check_run_flags: the flags the two diffusion trainers share, checked in one place."""
    refused(lambda: train_textual_inversion.main(TEXTUAL_INVERSION + ["--output_dir", str(tmp_path / "out"), *extra]),
            capsys, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (["--adam_beta1", "2"], ["--adam_beta1 2.0: must be in [0, 1)"]),
    (["--adam_beta2", "-1"], ["--adam_beta2 -1.0: must be in [0, 1)"]),
    (["--adam_epsilon", "-1"], ["--adam_epsilon -1.0: must be >= 0"]),
    (["--adam_weight_decay", "-1"], ["--adam_weight_decay -1.0: must be >= 0"]),
    (["--snr_gamma", "1e308"], ["--snr_gamma: '1e308' is beyond float32's range"]),
    (["--prior_loss_weight", "1e30"], ["--prior_loss_weight 1e+30: must be at most 1e6"]),
])
def test_dreambooth_optimizer_and_loss_values_are_one_line(extra, words, tmp_path, capsys, no_model_work):
    """torch's AdamW raised these as tracebacks after the model had loaded; 1e308 overflowed a float32 tensor."""
    refused(lambda: train_dreambooth.main(["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", ".",
                                           "--instance_prompt", "x", "--output_dir", str(tmp_path / "out"), *extra]),
            capsys, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (["--dataloader_num_workers", "-1"], ["--dataloader_num_workers -1: must be from 0 to"]),
    (["--dataloader_num_workers", "100000"], ["--dataloader_num_workers 100000"]),
    (["--num_synthetic_eval", "-5"], ["--num_synthetic_eval -5: must be >= 0"]),
    (["--num_synthetic_train", "-3"], ["--num_synthetic_train -3"]),
    (["--image_size", "17"], ["--image_size 17: must be a multiple of the patch size 8"]),
    (["--image_size", "100000"], ["--image_size 100000", "needs about"]),
    (["--num_synthetic_train", "1000000000"], ["--num_synthetic_train 1000000000", "held in memory"]),
])
def test_train_emotion_bad_values_are_one_line_before_any_work(extra, words, tmp_path, capsys, memory):
    refused(lambda: train_emotion.main(["--output_dir", str(tmp_path / "e"), *extra]), capsys, *words)
    assert not (tmp_path / "e").exists()


def test_predict_emotion_bad_device_and_batch_are_one_line(tmp_path, capsys, memory):
    image = FIXTURES / "images" / "rgba.png"
    for device in ("meta", "bogus"):
        refused(lambda: predict_emotion.main([str(image), "--device", device]), capsys, f"--device {device}")
    (tmp_path / "file").write_text("x")
    refused(lambda: predict_emotion.main([str(image), "--faces", "--draw", str(tmp_path / "file")]), capsys,
            f"--draw {tmp_path / 'file'}: cannot write there: it is a file")
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 4000)).save(big)
    memory["bytes"] = 50 * 2**20
    refused(lambda: predict_emotion.main([str(big), str(big), "--batch_size", "2"]), capsys,
            "--batch_size 2 (2 images, decoded)", "lower --batch_size")


# ---- 5. --lora is the same flag everywhere --------------------------------------------------------------------
def test_score_parses_lora_scale_as_sample_py_does(tmp_path, monkeypatch):
    import world.dreambooth_demo as demo
    seen = {}
    monkeypatch.setattr(demo, "evaluate", lambda model, loras, **kw: seen.setdefault("loras", loras) and {})
    lora = LORA / "kohya.safetensors"
    demo.score_main([str(WORLD_SD), "--lora", f"{lora}:0.5", "--lora", str(lora), "--out", str(tmp_path / "s")])
    assert seen["loras"] == [(str(lora), 0.5), (str(lora), 1.0)]


@pytest.mark.parametrize("what, words", [("folder", "holds no LoRA .safetensors file"),
                                         ("/dev/null", "is a character device, not a LoRA file"),
                                         ("missing", "no such file or folder")])
def test_a_lora_that_is_not_a_file_says_what_it_is(what, words, tmp_path, capsys, no_model_work):
    import world.dreambooth_demo as demo
    if what == "/dev/null" and not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    path = {"folder": str(tmp_path), "/dev/null": "/dev/null", "missing": str(tmp_path / "none.safetensors")}[what]
    refused(lambda: sample.main(sample_argv(tmp_path / "out", "--lora", path)), capsys, f"--lora {path}", words)
    refused(lambda: demo.score_main([str(WORLD_SD), "--lora", path, "--out", str(tmp_path / "s")]), capsys,
            f"--lora {path}", words)
    refused(lambda: train_dreambooth.main(["--pretrained_model_name_or_path", str(FOLDER), "--instance_data_dir", ".",
                                           "--instance_prompt", "x", "--lora", path]), capsys, f"--lora {path}", words)


def test_the_reliability_page_cites_symbols_that_exist():
    """docs/reliability.md's section on these refusals names code by symbol; each is still defined there."""
    cited = {"common/state_dict.py": ["check_finite", "load_strict"], "common/memory.py": ["check_memory"],
             "common/flags.py": ["UsageError", "exit_usage", "check_seed", "check_device", "read_lines"],
             "common/files.py": ["check_writable"], "common/run_config.py": ["finite_float"],
             "diffusion/pipeline.py": ["NonFiniteError", "UNET_MAPS", "VAE_DECODER_MAPS"],
             "dreambooth/memory.py": ["UNET_TRAINING_MAPS"],
             "diffusion/checkpoints/lora_files.py": ["MAX_SCALE", "read_lora", "load_lora_files"],
             "world/dreambooth_demo.py": ["SCORE_BATCH"]}
    page = (ROOT / "docs" / "reliability.md").read_text()
    for file, names in cited.items():
        source = (ROOT / file).read_text()
        assert f"`{file}`" in page, file
        for name in names:
            assert f"`{name}`" in page, name
            assert re.search(rf"^(?:def |class )?(?:\w+, )*{name}\b", source, re.M), (file, name)
    assert (ROOT / "bench" / "sampling_memory.py").is_file()


def test_the_output_check_leaves_nothing_yet_the_output_is_written(tmp_path):
    """check_writable removes the folders it made for its proof; a program that writes its output later makes
    them then (python -m dreambooth.evaluate --out NEW/FOLDER/scores.json)."""
    from dreambooth import evaluate
    from dreambooth.prompts import PROMPTS_FILE
    data = FIXTURES / "evaluate"
    out = tmp_path / "new" / "folder" / "scores.json"
    assert evaluate.main(["--real", str(data / "real"), "--generated", str(data / "generated"), "--prompts",
                          str(data / "generated" / PROMPTS_FILE), "--dino", str(FIXTURES / "dino" / "hf_vitmodel"),
                          "--clip", str(FIXTURES / "clip_model" / "l14"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["dino"] > 0


def test_the_benchmark_of_a_model_that_computes_nan_is_one_line(tmp_path, capsys):
    """python -m dreambooth.evaluate benchmark generates with the pipeline: no black image is scored."""
    import shutil

    from dreambooth import evaluate
    shutil.copytree(FIXTURES / "evaluate" / "real", tmp_path / "dog6")
    lora = world_lora(tmp_path / "big.safetensors", 1e18)
    code = evaluate.main(["benchmark", "--model", str(WORLD_SD), "--lora", str(lora), "--subject", str(tmp_path / "dog6"),
                          "--dino", str(FIXTURES / "dino" / "hf_vitmodel"), "--clip", str(FIXTURES / "clip_model" / "l14"),
                          "--num_prompts", "1", "--images_per_prompt", "1", "--ddim_steps", "1", "--H", "32",
                          "--outdir", str(tmp_path / "bench"), "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 1 and "holds NaN or infinity" in err and "Traceback" not in err
    assert not (tmp_path / "bench" / "scores.json").exists()
