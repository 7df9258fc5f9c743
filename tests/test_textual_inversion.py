"""Textual-inversion embeddings (clip/textual_inversion.py) against diffusers' load_textual_inversion.

tools/make_reference_textual_inversion.py wrote tiny embeddings for the tiny SD fixture (text width 32) in
every format we read (diffusers' learned_embeds.safetensors and .bin, A1111's .pt and .safetensors,
rinongal's .pt with its nn.ParameterDict), one and several vectors each, and for each case what diffusers
made of them: the prompt's token ids after maybe_convert_prompt, the text states, and the image of
StableDiffusionPipeline after load_textual_inversion. sample.py --embedding must give the same ids, states
within 1e-4 and images within 2/255.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from clip.textual_inversion import (EmbeddingError, add_embeddings, expand_prompt, parse_embedding_flags,
                                    read_embedding, read_embeddings, save_embedding, vector_tokens)
from common.state_dict import read_safetensors, write_safetensors
from diffusion.checkpoints.load import load_stable_diffusion

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "tests" / "fixtures" / "sd" / "tiny_diffusers"
SINGLE = ROOT / "tests" / "fixtures" / "sd" / "tiny_single.safetensors"
TI = ROOT / "tests" / "fixtures" / "textual_inversion"
META = json.loads((TI / "reference.json").read_text())
REF = read_safetensors(TI / "reference.safetensors")
MAX_DIFF = 2   # out of 255

pytestmark = pytest.mark.usefixtures("one_thread")


def flags(case: dict) -> list[str]:
    return [str(TI / value) for value in case["embeddings"]]


def run_sample(tmp_path: Path, case: dict, *extra: str) -> Path:
    run = META["run"]
    argv = ["--ckpt", str(FOLDER), "--outdir", str(tmp_path), "--prompt", case["prompt"], "--n_samples", "1",
            "--ddim_steps", str(run["num_inference_steps"]), "--scale", str(run["guidance_scale"]),
            "--H", str(run["height"]), "--W", str(run["width"]), "--seed", str(run["seed"]), "--device", "cpu",
            *[a for value in flags(case) for a in ("--embedding", value)], *extra]
    if case.get("negative_prompt"):
        argv += ["--negative_prompt", case["negative_prompt"]]
    return sample.main(argv)[0]


def image_diff(path: Path, reference: torch.Tensor) -> int:
    return int(np.abs(np.asarray(Image.open(path)).astype(int) - reference[0].numpy().astype(int)).max())


@pytest.mark.parametrize("name", META["cases"])
def test_sample_py_images_equal_diffusers_load_textual_inversion(name, tmp_path, capsys):
    diff = image_diff(run_sample(tmp_path, META["cases"][name]), REF[f"{name}.image"])
    assert diff <= MAX_DIFF, f"{name}: max |diff| {diff}/255"


@pytest.mark.parametrize("name", META["cases"])
def test_prompt_ids_and_states_equal_diffusers(name):
    """The new words' ids (the tokenizer learns them in diffusers' order), the expanded prompt (maybe_convert_prompt)
    and its token ids exactly, the text encoder's states within 1e-4."""
    case = META["cases"][name]
    models = load_stable_diffusion(FOLDER)
    add_embeddings(models.text_encoder, models.tokenizer, read_embeddings(parse_embedding_flags(flags(case))))
    assert models.tokenizer.added_tokens == case["added_tokens"]
    assert models.text_encoder.token_embedding.num_embeddings == 1014 + len(case["added_tokens"])
    assert expand_prompt(case["prompt"], models.tokenizer) == case["converted_prompt"]
    for key, text in (("", case["prompt"]), ("negative.", case.get("negative_prompt"))):
        if text is None:
            continue
        ids = models.tokenizer([expand_prompt(text, models.tokenizer)], padding=True, max_length=77)
        assert torch.equal(ids, REF[f"{name}.{key}ids"])
        with torch.no_grad():
            states = models.text_encoder(ids).last_hidden_state[:, :REF[f"{name}.{key}states"].shape[1]]
        assert (states - REF[f"{name}.{key}states"]).abs().max() <= 1e-4


def test_the_embeddings_change_the_image():
    """The fixture can tell: each case's image is far from diffusers' image of the same prompt without the
    embeddings (their words then tokenise as BPE pieces)."""
    for name in META["cases"]:
        assert image_diff_tensors(REF[f"{name}.image"], REF[f"{name}.plain_image"]) > 20, name


def image_diff_tensors(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def test_single_file_checkpoint_takes_embeddings_too(tmp_path, capsys):
    case = META["cases"]["diffusers_multi"]
    path = run_sample(tmp_path, {**case, "prompt": case["prompt"]}, "--ckpt", str(SINGLE), "--config", str(FOLDER))
    assert image_diff(path, REF["diffusers_multi.image"]) <= MAX_DIFF


# ---- which word a file gives, and the files' contents -------------------------------------------------------
@pytest.mark.parametrize("name", META["files"])
def test_each_format_is_read_with_its_token(name):
    """The token: the one a diffusers file stores, else the file's name; the vectors as written (n, 32)."""
    info = META["files"][name]
    e = read_embedding(*parse_embedding_flags([str(TI / info["file"])])[0])
    assert e.token == (info["stored_token"] or Path(info["file"]).stem)
    assert e.vectors.shape == (info["vectors"], 32) and e.vectors.dtype == torch.float32
    assert e.format == {"diffusers": "diffusers", "diffusers_bin": "diffusers", "a1111_pt": "A1111 .pt",
                        "rinongal_pt": "rinongal .pt", "a1111_safetensors": "A1111 .safetensors"}[info["format"]]


def test_token_given_wins_and_a1111_name_entry_is_not_the_token(tmp_path):
    """FILE:TOKEN overrides the stored token; an A1111 .pt is named by its file (as A1111 does), not by its "name"."""
    assert read_embedding(*parse_embedding_flags([f"{TI / 'one.safetensors'}:<mine>"])[0]).token == "<mine>"
    vectors = torch.randn(2, 32)
    torch.save({"string_to_param": {"*": vectors}, "name": "something-else", "step": 5}, tmp_path / "style.pt")
    e = read_embedding(tmp_path / "style.pt")
    assert e.token == "style" and torch.equal(e.vectors, vectors)
    torch.save(vectors[0], tmp_path / "bare.pt")                  # a bare tensor: one vector, the file's name
    assert read_embedding(tmp_path / "bare.pt").vectors.shape == (1, 32)


def test_multi_vector_prompt_expansion_is_diffusers_maybe_convert_prompt():
    models = load_stable_diffusion(FOLDER)
    add_embeddings(models.text_encoder, models.tokenizer, read_embeddings(parse_embedding_flags(
        [str(TI / "multi.safetensors"), str(TI / "one.safetensors")])))
    tok = models.tokenizer
    assert vector_tokens("<multi>", 3) == ["<multi>", "<multi>_1", "<multi>_2"]
    assert expand_prompt("<multi>,<multi> and <one>", tok) == \
        "<multi> <multi>_1 <multi>_2,<multi> <multi>_1 <multi>_2 and <one>"
    assert expand_prompt("a plain prompt", tok) == "a plain prompt"
    # matched after cleanup, as an added word is (lower case), but replaced in the raw text: as diffusers, a
    # word written in capitals keeps its first vector only
    assert tok.tokenize("a <MULTI>")[-1] == "<multi>" and expand_prompt("a <MULTI>", tok) == "a <MULTI>"


def test_trained_style_round_trip(tmp_path):
    vectors = torch.randn(3, 32)
    e = read_embedding(save_embedding(tmp_path / "learned_embeds.safetensors", "<x>", vectors))
    assert e.token == "<x>" and torch.equal(e.vectors, vectors) and e.format == "diffusers"


# ---- bad input: one line naming the file, nothing sampled ------------------------------------------------------
def refused(tmp_path: Path, capsys, *values: str, prompt: str = "a photo") -> str:
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(FOLDER), "--outdir", str(tmp_path / "out"), "--prompt", prompt, "--n_samples", "1",
                     "--ddim_steps", "1", "--H", "32", "--W", "32", *[a for v in values for a in ("--embedding", v)]])
    message = str(e.value)
    assert message.startswith("sample.py: error: --embedding ") and "\n" not in message
    assert not (tmp_path / "out" / "samples").exists() or not any((tmp_path / "out" / "samples").glob("*.png"))
    return message


def test_a_token_already_in_the_vocabulary_is_refused(tmp_path, capsys):
    message = refused(tmp_path, capsys, f"{TI / 'one.safetensors'}:a</w>")
    assert "one.safetensors" in message and "already in the tokenizer's vocabulary" in message
    message = refused(tmp_path, capsys, f"{TI / 'one.safetensors'}:a")
    assert "'a' is already in" in message


def test_two_files_claiming_one_token_are_refused(tmp_path, capsys):
    message = refused(tmp_path, capsys, str(TI / "one.safetensors"), f"{TI / 'a1111-one.pt'}:<one>")
    assert "a1111-one.pt" in message and "one.safetensors" in message and "'<one>'" in message
    # an n-vector word's other tokens count too: <multi>_1 is taken by the three-vector <multi>
    message = refused(tmp_path, capsys, str(TI / "multi.safetensors"), f"{TI / 'one.safetensors'}:<multi>_1")
    assert "'<multi>_1'" in message


def test_an_embedding_of_another_width_is_refused(tmp_path, capsys):
    write_safetensors(tmp_path / "sd2.safetensors", {"<wide>": torch.randn(2, 1024)})
    message = refused(tmp_path, capsys, str(tmp_path / "sd2.safetensors"))
    assert "sd2.safetensors" in message and "1024 wide" in message and "32" in message


def test_non_finite_vectors_are_refused(tmp_path, capsys):
    bad = torch.randn(2, 32)
    bad[1, 3] = float("nan")
    write_safetensors(tmp_path / "nan.safetensors", {"<nan>": bad})
    assert "nan.safetensors: tensor <nan> holds non-finite values (1 NaN" in refused(tmp_path, capsys,
                                                                                       str(tmp_path / "nan.safetensors"))


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


class Unknown:
    pass


def test_a_pickle_holding_more_than_tensors_is_refused_unrun(tmp_path, capsys, monkeypatch):
    """A global off the allowlist (code) is refused by the restricted unpickler; a global it would read as an
    inert placeholder (Lightning's ModelCheckpoint), or one numpy scalar, by the embedding reader."""
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "hook": Evil()}, tmp_path / "evil.pt")
    message = refused(tmp_path, capsys, str(tmp_path / "evil.pt"))
    assert "evil.pt" in message and "refused to unpickle the global 'posix.system'" in message
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "extra": Unknown()}, tmp_path / "odd.pt")
    assert "refused to unpickle the global" in refused(tmp_path, capsys, str(tmp_path / "odd.pt"))
    # a class pickled under the name of one the unpickler reads as inert data (the module need not be installed)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    checkpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    monkeypatch.setattr(sys.modules["pytorch_lightning.callbacks.model_checkpoint"], "ModelCheckpoint", checkpoint,
                        raising=False)
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "callback": checkpoint()}, tmp_path / "lightning.pt")
    message = refused(tmp_path, capsys, str(tmp_path / "lightning.pt"))
    assert "lightning.pt: the file['callback'] is a pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" \
        in message and "only tensors" in message
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "step": np.float64(3.0)}, tmp_path / "numpy.pt")
    assert "numpy.pt: the file['step'] is a numpy" in refused(tmp_path, capsys, str(tmp_path / "numpy.pt"))


def test_other_files_are_refused_by_name(tmp_path, capsys):
    write_safetensors(tmp_path / "lora.safetensors", {"a.weight": torch.randn(2, 2), "b.weight": torch.randn(2, 2)})
    assert "lora.safetensors: not a textual-inversion embedding" in refused(tmp_path, capsys,
                                                                            str(tmp_path / "lora.safetensors"))
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)})
    assert "an SDXL embedding" in refused(tmp_path, capsys, str(tmp_path / "xl.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 32), "#": torch.randn(1, 32)}}, tmp_path / "two.pt")
    assert "must hold one embedding" in refused(tmp_path, capsys, str(tmp_path / "two.pt"))
    write_safetensors(tmp_path / "ids.safetensors", {"<ids>": torch.arange(32)[None]})
    assert "expected floating-point vectors" in refused(tmp_path, capsys, str(tmp_path / "ids.safetensors"))
    assert "missing.pt: no such file or folder" in refused(tmp_path, capsys, str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    assert "holds neither learned_embeds.safetensors" in refused(tmp_path, capsys, str(tmp_path / "empty"))
    assert "token after the colon is empty" in refused(tmp_path, capsys, f"{TI / 'one.safetensors'}:")
    (tmp_path / "notes.txt").write_text("hello")
    assert "not an embedding file" in refused(tmp_path, capsys, str(tmp_path / "notes.txt"))


def test_nothing_is_added_when_one_file_is_refused():
    """add_embeddings checks every file first: a refusal leaves the tokenizer and the text encoder as they were."""
    models = load_stable_diffusion(FOLDER)
    embeddings = read_embeddings(parse_embedding_flags([str(TI / "multi.safetensors"), f"{TI / 'one.safetensors'}:a"]))
    with pytest.raises(EmbeddingError, match="one.safetensors"):
        add_embeddings(models.text_encoder, models.tokenizer, embeddings)
    assert models.tokenizer.added_tokens == {} and len(models.tokenizer) == 1014
    assert models.text_encoder.token_embedding.num_embeddings == 1014
