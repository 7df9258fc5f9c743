"""CLIP's tokenizer: text cleanup, pre-tokenisation, byte-level BPE, then [start] ids [end] [pad ...].

    "A photo of  sks DOG!"
      -> cleanup      NFC, every run of whitespace -> one space, lower-case   "a photo of sks dog!"
      -> split        letter runs, single digits, punctuation runs, 's 't 're 've 'm 'll 'd;
                      whitespace is dropped                               ["a","photo","of","sks","dog","!"]
      -> bytes        each UTF-8 byte becomes one printable character (GPT-2's byte table)
      -> BPE          merge pairs by rank; the last piece of a word carries "</w>"
                                                                   ["a</w>","photo</w>",...,"!</w>"]
      -> ids          [49406] + ids[:75] + [49407], then padding with the pad token up to 77

The cleanup and the split are transformers' `CLIPTokenizer` (the tokenizers-backed one; in
transformers 5 `CLIPTokenizerFast` is the same class). OpenAI's original tokenizer first runs `ftfy`
and unescapes HTML, so it differs on full-width letters, ligatures, curly quotes and `&amp;`;
transformers 4's pure-Python `CLIPTokenizer` without ftfy also differed, putting each CJK ideograph
in a word of its own and dropping control characters. diffusers pipelines use transformers'
tokenizer, so we follow its tokenizers-backed version. The BPE itself runs in the `tokenizers` library.

Where the vocabulary comes from (`CLIPTokenizer.from_pretrained`):
- a folder with `vocab.json` + `merges.txt` (+ `tokenizer_config.json`, `special_tokens_map.json`):
  the `tokenizer/` folder of an SD v1 checkpoint;
- a `tokenizer.json` file, or a folder holding one;
- nothing: the BPE merges OpenAI published with CLIP, shipped here as `bpe_simple_vocab_16e6.txt.gz`
  (MIT, see `LICENSE-bpe_simple_vocab_16e6.txt`), so an SD v1 single-file checkpoint needs no folder.
  SD 2.x's tokenizer/ is the same vocabulary padded with "!" (id 0, as OpenCLIP's own tokenizer pads
  with 0): `from_pretrained(None, pad_token=SD2_PAD_TOKEN)`, for an SD 2.x single file.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from common.files import read_json

SHIPPED_VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
# OpenAI's CLIP keeps the first 48,894 merges of that file: a budget of 49,152 BPE tokens minus the 256
# byte tokens and the 2 special tokens. 256 bytes + 256 "byte</w>" + 48,894 merges + 2 specials = 49,408.
SHIPPED_NUM_MERGES = 49152 - 256 - 2

START_TOKEN = "<|startoftext|>"   # id 49406 in CLIP's vocabulary
END_TOKEN = "<|endoftext|>"       # id 49407; also the unknown token and, in SD v1, the pad token
END_OF_WORD = "</w>"              # suffix of the last BPE piece of each word
MODEL_MAX_LENGTH = 77             # CLIP's 77 position embeddings: start + 75 tokens + end
SD2_PAD_TOKEN = "!"               # stabilityai/stable-diffusion-2-1's special_tokens_map.json: "pad_token": "!"

# The split (pre-tokenisation) pattern of transformers' CLIPTokenizer, verbatim, and OpenAI's before it:
# the two special tokens, English contractions, runs of letters, single digits, runs of anything else
# that is not whitespace. Whitespace matches nothing and is dropped ("removed" + "invert" below).
SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                 r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
NO_LIMIT = 10**6                  # transformers writes 1e30 for "no limit"; we then keep CLIP's 77
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order of roles


class TokenizerFileError(ValueError):
    """A tokenizer file that is missing, unreadable or inconsistent. The message names the file."""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table from each of the 256 byte values to a printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 (control characters, space, ...) get
    the characters 256, 257, ... in byte order, so BPE never sees whitespace or control characters.
    The table's order (printable bytes first) is also the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


@dataclass
class SpecialToken:
    content: str
    normalized: bool  # True: matched after cleanup (so "<|STARTOFTEXT|>" matches); False: raw text only


def _special(value, *, where: str) -> SpecialToken:
    """A special token as tokenizer_config.json writes it: a plain string, or an AddedToken dict."""
    if isinstance(value, str):
        return SpecialToken(value, normalized=False)  # transformers matches plain-string specials raw
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return SpecialToken(value["content"], normalized=bool(value.get("normalized", False)))
    raise TokenizerFileError(f"{where}: a special token must be a string or a dict with 'content', got {value!r}")


class CLIPTokenizer:
    """Prompts -> (B, 77) token ids, exactly as transformers' CLIPTokenizer gives them."""

    def __init__(self, *, vocab: dict[str, int], merges: list[tuple[str, str]],
                 special: dict[str, SpecialToken] | None = None, model_max_length: int = MODEL_MAX_LENGTH,
                 source: str = "vocabulary"):
        special = {**{role: SpecialToken(END_TOKEN, normalized=False) for role in SPECIAL_ROLES},
                   "bos_token": SpecialToken(START_TOKEN, normalized=False), **(special or {})}
        _check_vocab(vocab, merges, special, source=source)
        self.vocab, self.merges = vocab, merges
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token = special["bos_token"].content, special["eos_token"].content
        self.pad_token, self.unk_token = special["pad_token"].content, special["unk_token"].content
        self.bos_token_id, self.eos_token_id = vocab[self.bos_token], vocab[self.eos_token]
        self.pad_token_id = vocab[self.pad_token]

        backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                end_of_word_suffix=END_OF_WORD, unk_token=self.unk_token, fuse_unk=False))
        backend.normalizer = normalizers.Sequence([
            normalizers.NFC(),                          # compose accents: "e\u0301" -> "\u00e9"
            normalizers.Replace(Regex(r"\s+"), " "),    # tabs, newlines, runs of spaces -> one space
            normalizers.Lowercase(),
        ])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),  # bytes -> byte_to_unicode() characters
        ])
        # Literal special-token text in a prompt becomes the special id. When several roles name the
        # same string (SD v1: eos, unk and pad are all <|endoftext|>), the last role sets the flag.
        flags = {tok.content: tok.normalized for tok in (special[role] for role in SPECIAL_ROLES)}
        backend.add_special_tokens([AddedToken(content, special=True, normalized=normalized)
                                    for content, normalized in flags.items()])
        self._backend = backend
        self.added_tokens: dict[str, int] = {}   # new words (add_tokens) -> their ids, after the vocabulary's

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, pad_token: str | None = None) -> "CLIPTokenizer":
        """Load a tokenizer folder (vocab.json + merges.txt), a tokenizer.json, or (None) the shipped one.

        pad_token: with no path, pad the shipped vocabulary with this token (SD2_PAD_TOKEN: SD 2.x's
        tokenizer, whose special_tokens_map.json marks <|startoftext|>, <|endoftext|> normalized and pads
        with a plain "!"); a folder says its own."""
        if path is None:
            shipped = _read_shipped_vocab(SHIPPED_VOCAB)
            if pad_token is not None:
                shipped["special"] = {role: SpecialToken(START_TOKEN if role == "bos_token" else END_TOKEN, normalized=True)
                                      for role in SPECIAL_ROLES} | {"pad_token": SpecialToken(pad_token, normalized=False)}
            return cls(**shipped)
        if pad_token is not None:
            raise ValueError(f"pad_token={pad_token!r}: only for the shipped vocabulary; {path} says its own")
        path = Path(path)
        if path.is_file() and path.suffix == ".json":
            return cls(**_read_tokenizer_json(path, _read_special_tokens(path.parent)))
        if not path.is_dir():
            raise TokenizerFileError(f"{path}: no such tokenizer folder or tokenizer.json file")
        special = _read_special_tokens(path)
        if (path / "vocab.json").exists() or (path / "merges.txt").exists():
            return cls(**_read_vocab_and_merges(path), **special)
        if (path / "tokenizer.json").exists():
            return cls(**_read_tokenizer_json(path / "tokenizer.json", special))
        raise TokenizerFileError(f"{path}: a tokenizer folder needs vocab.json and merges.txt (the layout of an "
                                 f"SD v1 tokenizer/ folder) or a tokenizer.json; found {sorted(p.name for p in path.iterdir())}")

    # ---- tokenising ----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[str]:
        """The BPE pieces of one prompt, without the start/end tokens: "a dog" -> ["a</w>", "dog</w>"]."""
        _check_prompts([prompt])
        return self._backend.encode(prompt, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    def __call__(self, prompts: list[str] | str, *, padding: bool = True,
                 max_length: int = MODEL_MAX_LENGTH) -> torch.Tensor | list[list[int]]:
        """Token ids of each prompt: [start] + at most max_length-2 BPE ids + [end].

        padding=True: a LongTensor (B, max_length), each row filled up with the pad id (what SD feeds
        its text encoder). padding=False: a list of B lists of ids, unpadded (still truncated).
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts
        _check_prompts(prompts)
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: room is needed for the start and end tokens")
        # in parallel threads; "fast" skips the character offsets, which we do not use
        encodings = self._backend.encode_batch_fast(list(prompts), add_special_tokens=False)
        # Truncation keeps the end token, as transformers' truncation=True does.
        rows = [[self.bos_token_id, *e.ids[:max_length - 2], self.eos_token_id] for e in encodings]
        if not padding:
            return rows
        ids = np.full((len(rows), max_length), self.pad_token_id, dtype=np.int64)  # (B, max_length)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row  # numpy: ~7x faster than torch.tensor(list of lists) at B = 10,000
        return torch.from_numpy(ids)

    # ---- new words (textual inversion) ---------------------------------------------------------
    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Teach the tokenizer new words, each with the next free id (len(self) on): transformers'
        `tokenizer.add_tokens(...)`, as diffusers' textual inversion calls it. An added word is matched
        whole in the cleaned-up prompt before the split and BPE (tokenizers' AddedToken, normalized=True,
        special=False: "<cat-toy>" matches in "a <Cat-Toy>!"), anywhere, even inside a longer word.
        A word the tokenizer already has is refused (ValueError): it would keep its old id."""
        known = [t for t in tokens if t in self]
        if known or len(set(tokens)) != len(tokens) or not all(tokens):
            raise ValueError(f"add_tokens: {known or tokens} already known, repeated or empty")
        self._backend.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])
        ids = [self._backend.token_to_id(t) for t in tokens]
        self.added_tokens.update(zip(tokens, ids))
        return ids

    def __contains__(self, token: str) -> bool:
        """Whether `token` is a vocabulary entry or an added word (transformers' `token in get_vocab()`)."""
        return token in self.vocab or token in self.added_tokens

    def __len__(self) -> int:
        """The vocabulary and the added words: the ids this tokenizer can give (transformers' len(tokenizer))."""
        return len(self.vocab) + len(self.added_tokens)

    def save_vocab_files(self, folder: str | Path) -> None:
        """Write vocab.json + merges.txt, the layout of an SD v1 tokenizer/ folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab={len(self.vocab)}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, model_max_length={self.model_max_length})")


def _check_prompts(prompts) -> None:
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__} ({p!r:.60}), not a string")


def _check_vocab(vocab: dict, merges: list[tuple[str, str]], special: dict[str, SpecialToken], *, source: str) -> None:
    """Every merge must join two vocabulary tokens into a third; the special tokens must exist."""
    for n, (a, b) in enumerate(merges):
        missing = [t for t in (a, b, a + b) if t not in vocab]
        if missing:
            raise TokenizerFileError(
                f"{source}: merge {n + 1} ({a!r} + {b!r}) needs {missing[0]!r}, which the vocabulary lacks: "
                "vocab.json and merges.txt do not belong to the same tokenizer")
    for role, tok in special.items():
        if tok.content not in vocab:
            raise TokenizerFileError(f"{source}: the {role} {tok.content!r} is not in the vocabulary")


def _read_special_tokens(folder: Path) -> dict:
    """Special tokens and model_max_length from tokenizer_config.json, overridden by special_tokens_map.json.

    That precedence is transformers' for folders saved the classic way (SD v1's tokenizer/).
    """
    special, out = {}, {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.exists():
            continue
        config = read_json(file, error=TokenizerFileError, missing=TokenizerFileError)
        special.update({role: _special(config[role], where=f"{file} {role}") for role in SPECIAL_ROLES
                        if config.get(role) is not None})
        limit = config.get("model_max_length")
        if name == "tokenizer_config.json" and isinstance(limit, int) and limit < NO_LIMIT:
            out["model_max_length"] = limit  # SD v1 says 77
    return {"special": special, **out} if special else out


def _parse_merges(lines: list[str], *, source: str) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if not line or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFileError(f"{source} line {n + 1}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_vocab_and_merges(folder: Path) -> dict:
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).exists():
            raise TokenizerFileError(f"{folder}: {name} is missing; a CLIP tokenizer folder needs both vocab.json "
                                     "and merges.txt (or a tokenizer.json)")
    vocab = read_json(folder / "vocab.json", error=TokenizerFileError, missing=TokenizerFileError)
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise TokenizerFileError(f"{folder / 'vocab.json'}: expected an object mapping token strings to integer ids")
    text = (folder / "merges.txt").read_text(encoding="utf-8")
    merges = _parse_merges(text.split("\n"), source=str(folder / "merges.txt"))
    return {"vocab": vocab, "merges": merges, "source": f"{folder} (vocab.json + merges.txt)"}


def _read_tokenizer_json(path: Path, special: dict) -> dict:
    """The BPE vocabulary and merges of a tokenizers-library file; its added tokens give the flags."""
    data = read_json(path, error=TokenizerFileError, missing=TokenizerFileError)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerFileError(f"{path}: not a BPE tokenizer.json (no model.type == 'BPE' with a vocab)")
    # Older files write each merge as "a b", newer ones as ["a", "b"].
    raw = model.get("merges", [])
    merges = _parse_merges([m if isinstance(m, str) else " ".join(m) for m in raw], source=f"{path} model.merges")
    added = {t["content"]: SpecialToken(t["content"], bool(t.get("normalized", False)))
             for t in data.get("added_tokens") or [] if t.get("special")}
    defaults = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    roles = {role: added.get(content, SpecialToken(content, False)) for role, content in defaults.items()}
    roles.update(special.get("special", {}))
    return {"vocab": model["vocab"], "merges": merges, "special": roles, "source": str(path),
            **({"model_max_length": special["model_max_length"]} if "model_max_length" in special else {})}


def _read_shipped_vocab(path: Path) -> dict:
    """OpenAI's merges file -> the same vocab.json/merges.txt pair the SD v1 tokenizer/ folder holds."""
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot read the shipped CLIP vocabulary ({e})") from e
    # line 0 is a header ('"bpe_simple_vocab_16e6.txt#version: 0.2'); then one merge per line
    merges = _parse_merges(lines[1:1 + SHIPPED_NUM_MERGES], source=str(path))
    byte_chars = list(byte_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + [a + b for a, b in merges] + [START_TOKEN, END_TOKEN]
    return {"vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges, "source": str(path),
            # the flags of SD v1's tokenizer/ folder (tokenizer_config.json + special_tokens_map.json)
            "special": {"bos_token": SpecialToken(START_TOKEN, normalized=True)}}
