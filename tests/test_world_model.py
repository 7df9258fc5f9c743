"""The embedded tiny text-to-image model (embedded/world_sd) and what is built around it: the world's
CLIP-format vocabulary, the DreamBooth demo's subject and scores, and the default commands."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train_dreambooth
from clip.tokenizer import CLIPTokenizer
from embedded import WORLD_SD
from world.checker import check
from world.scene import COLOURS, Scene, draw
from world.subject import instance_images, looks_like_subject, reference_colours, subject_similarity
from world.vocabulary import RARE_TOKEN, build_tokenizer, world_words
from world.world import TwoColourWorld, World

MAX_BYTES = 20 * 2**20


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small models: threads only add overhead, and CI shares the machine
    yield
    torch.set_num_threads(threads)


# ---- vocabulary -------------------------------------------------------------------------------------
def test_every_world_word_is_one_token_and_the_files_reload(tmp_path):
    tokenizer = build_tokenizer()
    for word in world_words():
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    tokenizer.save_vocab_files(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = ["a large yellow star on a blue background", "a sks star", "a zebra, 3 stripes!"]
    assert torch.equal(again(prompts, max_length=20), tokenizer(prompts, max_length=20))
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]   # unknown words: byte pieces


def test_rare_token_never_in_a_caption_and_captions_fit():
    tokenizer, world = build_tokenizer(), World(0)
    for i in range(500):
        _, caption, _ = world.sample(i)
        pieces = tokenizer.tokenize(caption)
        assert RARE_TOKEN + "</w>" not in pieces
        assert len(pieces) + 2 <= tokenizer.model_max_length


# ---- the DreamBooth subject --------------------------------------------------------------------------
def test_subject_images_deterministic_and_scored_apart_from_plain_stars():
    a, b = instance_images(), instance_images()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    reference = reference_colours()
    for image in a:
        assert looks_like_subject(image) and subject_similarity(image, reference) > 0.9
    for colour in COLOURS:
        background = "white" if colour != "white" else "black"
        star = draw(Scene(colour=colour, shape="star", size="large", position="center", background=background))
        assert not looks_like_subject(star), colour
        assert subject_similarity(star, reference) < 0.7, colour


def test_two_colour_world_never_draws_the_subject():
    """The VAE decoder's two-colour scenes: a second colour at the centre, never the subject's own
    combination (an orange star with a blue centre), and every sample a pure function of its index."""
    world, seen = TwoColourWorld(0, split="all"), set()
    for i in range(3000):
        scene, _ = world.scene(i)
        assert scene.centre not in (None, scene.colour, scene.background), scene
        assert (scene.colour, scene.shape, scene.centre) != ("orange", "star", "blue"), i
        seen.add((scene.colour, scene.shape))
    assert ("orange", "star") in seen   # orange stars are drawn, with other centres
    assert np.array_equal(world.batch(5, 3).images, TwoColourWorld(0, split="all").batch(5, 3).images)


# ---- the shipped model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    from diffusion.checkpoints.load import load_stable_diffusion
    models = load_stable_diffusion(WORLD_SD)   # the same strict loader as a real SD v1 folder
    for m in (models.unet, models.vae, models.text_encoder):
        m.eval()
    return models


def test_shipped_weights_small_and_in_sd_layout(models):
    size = sum(f.stat().st_size for f in WORLD_SD.rglob("*") if f.is_file())
    assert size <= MAX_BYTES
    index = json.loads((WORLD_SD / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert models.vae.config.spatial_factor == 4 and models.unet.config.sample_size == 16


# (prompt, seed): what the shipped model draws, read back by the checker
FIXED = [("a red circle", 0), ("a green star", 1), ("a large blue square on a white background", 2),
         ("a yellow triangle", 3), ("a black cross", 4), ("a purple star", 5)]


def test_fixed_prompts_draw_the_asked_colour_and_shape(models):
    from diffusion.pipeline import generate
    wrong = []
    for prompt, seed in FIXED:
        image = generate(models, [prompt], seed=seed, steps=50, progress=False)[0].numpy()
        found = check(image)
        words = prompt.replace(" on a white background", "").split()
        if (found.colour, found.shape) != (words[-2], words[-1]):
            wrong.append((prompt, seed, found.colour, found.shape))
    assert len(wrong) <= 1, wrong   # one miss allowed: another CPU's float rounding may tip a sample


# ---- the default commands ----------------------------------------------------------------------------
def test_sample_without_ckpt_uses_the_embedded_model(tmp_path, capsys):
    written = sample.main(["--outdir", str(tmp_path), "--n_samples", "2", "--ddim_steps", "10"])
    assert len(written) == 3 and all(p.is_file() for p in written)
    from PIL import Image
    assert Image.open(written[0]).size == (64, 64)   # the model's own size, not SD's 512
    assert "embedded" in capsys.readouterr().err
    config = (tmp_path / "run_config.toml").read_text()
    assert str(WORLD_SD) in config and "yellow star" in config


def test_train_dreambooth_without_arguments_runs_the_demo(monkeypatch):
    import world.dreambooth_demo as demo
    called = []
    monkeypatch.setattr(demo, "run", lambda: called.append(True) or 0)
    monkeypatch.setattr(sys, "argv", ["train_dreambooth.py"])
    src = Path(train_dreambooth.__file__).read_text()
    code = compile(src, train_dreambooth.__file__, "exec")
    with pytest.raises(SystemExit) as exit_:
        exec(code, {"__name__": "__main__", "__file__": train_dreambooth.__file__})
    assert exit_.value.code == 0 and called == [True]


def test_demo_end_to_end_in_small(tmp_path, monkeypatch):
    """The demo's whole path (instance images, class images, four trainings, scores, grid) with a few
    steps of everything; the full run's figures are in embedded/README.md."""
    import world.dreambooth_demo as demo
    steps = demo.TRAINING.index("--max_train_steps") + 1
    monkeypatch.setattr(demo, "TRAINING", [*demo.TRAINING[:steps], "3", *demo.TRAINING[steps + 1:]])
    steps = demo.TEXTUAL_INVERSION.index("--max_train_steps") + 1
    monkeypatch.setattr(demo, "TEXTUAL_INVERSION", [*demo.TEXTUAL_INVERSION[:steps], "3",
                                                    *demo.TEXTUAL_INVERSION[steps + 1:]])
    monkeypatch.setattr(demo, "NUM_CLASS_IMAGES", 4)
    monkeypatch.setattr(demo, "FIDELITY_SEEDS", 1)
    monkeypatch.setattr(demo, "PRIOR_SEEDS", 2)
    monkeypatch.setattr(demo, "SAMPLING_STEPS", 3)
    assert demo.run(tmp_path) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert set(report) == {"base", "with_prior", "lora", "no_prior", "textual_inversion"}
    assert len(list((tmp_path / "class_images" / "samples").glob("*.png"))) == 4   # made once, read by both
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "with_prior" / "model_index.json").is_file()
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert set(report["lora"]) == set(report["base"])   # scored as the others
    assert (tmp_path / "textual_inversion" / "learned_embeds.safetensors").is_file()
    # textual inversion leaves the model as it was: its "a star" images are the base model's, bit for bit
    assert all((tmp_path / "scores" / "textual_inversion" / f.name).read_bytes() == f.read_bytes()
               for f in (tmp_path / "scores" / "base").glob("prior-*.png"))
    assert {k: report["textual_inversion"][k] for k in report["base"] if k.startswith("class_")} == \
        {k: v for k, v in report["base"].items() if k.startswith("class_")}


def test_demo_stops_at_a_failed_job_and_shows_its_log(tmp_path, monkeypatch, capsys):
    import world.dreambooth_demo as demo
    monkeypatch.setattr(demo, "FULL", ["--train_text_encoder", "--learning_rate", "-1"])
    assert demo.run(tmp_path) == 2                       # train_dreambooth.py's exit code for a bad flag
    out = capsys.readouterr().out
    assert "no_prior failed (exit 2)" in out and "--learning_rate -1.0: must be > 0" in out   # the log's end, shown
    assert not (tmp_path / "demo_report.json").exists()


def test_demo_scoring_refuses_bad_input_by_name(tmp_path, capsys):
    """`python -m world.dreambooth_demo score`, whose command lines the demo prints for users to retype."""
    import world.dreambooth_demo as demo
    assert demo.score_main([str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert demo.score_main([str(demo.WORLD_SD), "--lora", str(tmp_path / "bad.safetensors"),
                            "--out", str(tmp_path / "s")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.score_main([str(demo.WORLD_SD), "--steps", "0", "--out", str(tmp_path / "s")])
    assert "--steps 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---- pretraining: deterministic and resumable ----------------------------------------------------------
def test_pretraining_resumes_bit_for_bit(tmp_path, monkeypatch):
    import world.pretrain as pretrain_world
    monkeypatch.setattr(pretrain_world, "WARMUP", 2)
    monkeypatch.setattr(pretrain_world, "measure_scaling_factor",
                        lambda vae, world: round(1 / vae.encode(pretrain_world.to_pixels(world.batch(0, 16).images))
                                                 .mean.std().item(), 5))
    flags = ["--vae_steps", "4", "--steps", "4", "--checkpoint_every", "2", "--batch_size", "4", "--vae_batch_size", "4",
             "--vae_decoder_steps", "4"]
    pretrain_world.main(["--out", str(tmp_path / "a"), *flags])
    pretrain_world.main(["--out", str(tmp_path / "b"), *flags])
    for stage in ("vae", "vae_decoder", "t2i"):   # as if the run had stopped after step 2 of each stage
        (tmp_path / "b" / stage / "checkpoint-4.pt").unlink()
    pretrain_world.main(["--out", str(tmp_path / "b"), *flags])
    from safetensors.torch import load_file
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        a, b = (load_file(tmp_path / run / "model" / f"{part}.safetensors") for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_decoder_stage_on_a_finished_model_changes_only_the_decoder(tmp_path, monkeypatch):
    """Stage 3 with --base: the VAE decoder fine-tuned, the encoder, quant_conv (so the latents and the
    scaling factor), the UNet and the text encoder exactly the base's."""
    import world.pretrain as pretrain_world
    from diffusion.checkpoints.load import load_stable_diffusion
    pretrain_world.main(["--out", str(tmp_path), "--base", str(WORLD_SD), "--vae_decoder_steps", "2",
                         "--vae_batch_size", "4"])
    base, tuned = load_stable_diffusion(WORLD_SD), load_stable_diffusion(tmp_path / "model")
    assert tuned.vae.config.scaling_factor == base.vae.config.scaling_factor
    changed = []
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        assert a.keys() == b.keys()
        changed += [f"{part}.{k}" for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in changed), changed
