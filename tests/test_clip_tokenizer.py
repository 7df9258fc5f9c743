"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer/CLIPTokenizerFast on 278 nasty prompts.

The reference ids come from tools/make_reference_clip.py. The vocab.json/merges.txt pair (1.5 MB) is
not a fixture: it is written here from the shipped vocabulary, so the folder-loading path is checked
against the same reference ids as the shipped one.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip.tokenizer import CLIPTokenizer, TokenizerFileError

FIXTURES = Path(__file__).parent / "fixtures" / "clip"
REF = json.loads((FIXTURES / "tokenizer_reference.json").read_text(encoding="utf-8"))
PROMPTS = REF["prompts"]


@pytest.fixture(scope="module")
def shipped() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, shipped) -> Path:
    """An SD v1 tokenizer/ folder: the committed JSON configs + vocab files written from the shipped vocabulary."""
    folder = tmp_path_factory.mktemp("tokenizer")
    for f in (FIXTURES / "tokenizer_sd_v1").iterdir():
        shutil.copy(f, folder / f.name)
    shipped.save_vocab_files(folder)
    return folder


def test_fixture_is_large_enough():
    assert len(PROMPTS) >= 200
    assert sum(len(ids) == 77 and ids[-1] == 49407 for ids in REF["input_ids_unpadded"]) >= 5  # truncated ones


def _assert_same_ids(tokenizer: CLIPTokenizer, *, tokens: bool = True) -> None:
    padded = tokenizer(PROMPTS)
    assert padded.dtype == torch.long and padded.shape == (len(PROMPTS), 77)
    expected = torch.tensor(REF["input_ids_padded"])
    bad = [PROMPTS[i] for i in range(len(PROMPTS)) if not torch.equal(padded[i], expected[i])]
    assert not bad, f"{len(bad)} prompts differ from transformers (padded), e.g. {bad[:3]!r}"
    unpadded = tokenizer(PROMPTS, padding=False)
    bad = [p for p, a, b in zip(PROMPTS, unpadded, REF["input_ids_unpadded"]) if a != b]
    assert not bad, f"{len(bad)} prompts differ from transformers (unpadded), e.g. {bad[:3]!r}"
    if tokens:
        bad = [p for p, t in zip(PROMPTS, REF["tokens"]) if tokenizer.tokenize(p) != t]
        assert not bad, f"{len(bad)} prompts tokenize differently, e.g. {bad[:3]!r}"


def test_shipped_vocabulary_matches_transformers(shipped):
    _assert_same_ids(shipped)


def test_sd_v1_folder_matches_transformers(sd_folder):
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder)
    _assert_same_ids(tokenizer, tokens=False)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77 and len(tokenizer.vocab) == 49408


@pytest.mark.parametrize("merges_as", ["pairs", "strings"])
def test_tokenizer_json_matches_transformers(tmp_path, shipped, merges_as):
    path = tmp_path / "tokenizer.json"
    shipped._backend.save(str(path))  # the tokenizers library's own file format
    if merges_as == "strings":        # older tokenizer.json files write each merge as "a b"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    _assert_same_ids(CLIPTokenizer.from_pretrained(path), tokens=False)
    _assert_same_ids(CLIPTokenizer.from_pretrained(tmp_path), tokens=False)  # the folder holding it


def test_known_ids(shipped):
    # "a photo of a cat" as every CLIP tokenizer gives it; "sks" is DreamBooth's rare token 48136.
    assert shipped(["a photo of a cat"], padding=False) == [[49406, 320, 1125, 539, 320, 2368, 49407]]
    assert shipped.tokenize("a photo of sks dog") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert shipped(["sks"], padding=False)[0][1] == 48136


def test_other_folder_configs(tmp_path, shipped):
    """A folder with no configs matches special-token text only raw; an SD 2.x config pads with "!"."""
    variants = REF["variants"]
    bare = tmp_path / "bare"
    shipped.save_vocab_files(bare)
    assert CLIPTokenizer.from_pretrained(bare)(variants["prompts"], padding=False) == variants["bare_folder_unpadded"]
    bang = tmp_path / "bang"
    shipped.save_vocab_files(bang)
    shutil.copy(FIXTURES / "tokenizer_pad_bang" / "tokenizer_config.json", bang)
    tokenizer = CLIPTokenizer.from_pretrained(bang)
    assert tokenizer.pad_token_id == variants["pad_bang_pad_token_id"] == 0
    assert tokenizer(variants["prompts"]).tolist() == variants["pad_bang_padded"]


def test_max_length_and_single_string(shipped):
    ids = shipped(["a photo of a cat " * 20], max_length=10)
    assert ids.shape == (1, 10) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert torch.equal(shipped("a dog"), shipped(["a dog"]))
    assert shipped([]).shape == (0, 77)


# ---- bad input ----------------------------------------------------------------------------------
def test_folder_missing_merges(tmp_path, shipped):
    shipped.save_vocab_files(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(TokenizerFileError, match="merges.txt is missing"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(TokenizerFileError, match="needs vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerFileError, match="no such tokenizer folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")


def test_vocab_and_merges_that_disagree(tmp_path, shipped):
    shipped.save_vocab_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    del vocab["photo</w>"]  # a merge result the merges still build
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"needs 'photo</w>'.*do not belong to the same tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_malformed_files(tmp_path, shipped):
    shipped.save_vocab_files(tmp_path)
    with open(tmp_path / "merges.txt", "a", encoding="utf-8") as f:
        f.write("one two three\n")
    with pytest.raises(TokenizerFileError, match=r"merges.txt line \d+: expected two tokens"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="vocab.json: not a readable JSON file"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_pad_token_not_in_vocab(tmp_path, shipped):
    shipped.save_vocab_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("prompts, message", [
    (["a dog", None], "prompt 1 is a NoneType"),
    ([3], "prompt 0 is a int"),
    ([b"bytes"], "prompt 0 is a bytes"),
    (42, "prompts must be a list of strings, got int"),
])
def test_non_string_prompts(shipped, prompts, message):
    with pytest.raises(TypeError, match=message):
        shipped(prompts)


def test_cli():
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "clip", "a photo of a cat", "Zoë 🐶", "--no_pad"],
                         capture_output=True, text=True, cwd=root, check=True)
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["a photo of a cat", "Zoë 🐶"]
    assert lines[0]["ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert lines[0]["tokens"] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]


def test_cli_bad_model_folder(tmp_path, capsys):
    from clip.__main__ import main
    assert main(["a dog", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err
