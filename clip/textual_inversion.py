"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation
using Textual Inversion"): a new word whose meaning is one or more learned rows of the text encoder's token
embedding, everything else frozen. This module reads the files users share and adds their words to a
model, as diffusers' `load_textual_inversion` does:

    embeddings = read_embeddings(parse_embedding_flags(["cat-toy.pt", "learned_embeds.safetensors:<x>"]))
    add_embeddings(models.text_encoder, models.tokenizer, embeddings)   # rows appended, words learned
    expand_prompt("a <x> backpack", models.tokenizer)    # -> "a <x> <x>_1 <x>_2 backpack" (3 vectors)

A word of n vectors becomes n tokens, `tok`, `tok_1`, ..., `tok_{n-1}`, each an added word of the tokenizer
(clip/tokenizer.py `add_tokens`, matched whole before BPE) with its own new row at the end of the token
embedding; a prompt names `tok` and `expand_prompt` (diffusers' `maybe_convert_prompt`) spells out the rest.

The files (`read_embedding`):
- diffusers' `learned_embeds.safetensors` (examples/textual_inversion): one tensor (n, D) named by its token;
  `learned_embeds.bin` and sd-concepts-library's files are the same dict pickled;
- A1111's `.pt`: {"string_to_param": {"*": (n, D)}, "name", "step", "string_to_token", ...}; rinongal's
  textual_inversion (the method's own code) pickles `string_to_param` as an nn.ParameterDict;
- A1111's `.safetensors`: {"emb_params": (n, D)}.
The word is the TOKEN given with the file (`FILE:TOKEN`), else the one a diffusers file stores, else the
file's name without its suffix, as A1111 names its embeddings. (diffusers itself reads A1111's "name" entry,
and takes "emb_params" for the token of an A1111 .safetensors: pass TOKEN, or name the file, to match it.)
Pickles go through the restricted unpickler (diffusion/checkpoints/ckpt.py), which runs nothing from the
file; an nn.ParameterDict becomes an inert placeholder holding its data (`PARAMETER_DICT`), and a file that
holds anything but tensors, numbers, strings and plain containers is refused.
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.state_dict import CheckpointError, check_finite, read_safetensors, write_safetensors

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")   # what a folder holds, in diffusers' order
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
# How torch pickles an nn.ParameterDict (rinongal's string_to_param): NEWOBJ of this class, then BUILD with
# the module's __dict__ ({"_parameters": {"*": Parameter}, "training": ..., hook OrderedDicts, ...}).
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"


class EmbeddingError(ValueError):
    """An embedding file or word that cannot be used; the message names the file."""


@dataclass
class Embedding:
    token: str                 # the word a prompt names
    vectors: torch.Tensor      # (n, D): the rows of tokens `vector_tokens(token, n)`
    file: str                  # where it was read (for messages)
    format: str                # "diffusers", "A1111 .pt", "rinongal .pt", "A1111 .safetensors"


def vector_tokens(token: str, n: int) -> list[str]:
    """The n tokens of an n-vector word, as diffusers names them: tok, tok_1, ..., tok_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


# ---- the flags ---------------------------------------------------------------------------------------------
def parse_embedding_flags(values: list[str]) -> list[tuple[Path, str | None]]:
    """--embedding FILE[:TOKEN] (repeatable) -> [(file, TOKEN or None)]. FILE may be a folder or a repo id of
    the Hugging Face cache (common/hub_cache.py) holding learned_embeds.safetensors or learned_embeds.bin, as
    diffusers' load_textual_inversion finds them; a FILE whose own name holds a colon is taken whole.
    Raises EmbeddingError, its message starting with the value (the caller puts the flag before it)."""
    from common.hub_cache import HubCacheError, resolve_model
    out = []
    for value in values:
        path, token = value, None
        if not Path(value).exists() and ":" in value:
            path, token = value.rsplit(":", 1)
            if not token.strip() or token != token.strip():
                raise EmbeddingError(f"{value}: the token after the colon is empty or has spaces at its ends "
                                     "(FILE or FILE:TOKEN)")
        try:
            found = resolve_model(path)
        except HubCacheError as e:
            raise EmbeddingError(f"{value}: {e}") from None
        out.append((_embedding_file(found, value=value), token))
    return out


def _embedding_file(path: Path, *, value: str) -> Path:
    if not path.is_dir():
        return path
    for name in DIFFUSERS_NAMES:
        if (path / name).is_file():
            return path / name
    raise EmbeddingError(f"{value}: the folder holds neither {' nor '.join(DIFFUSERS_NAMES)} "
                         f"(it holds: {', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'})")


# ---- reading the files -------------------------------------------------------------------------------------
def read_embeddings(files: list[tuple[Path, str | None]]) -> list[Embedding]:
    """Every file read (`read_embedding`), then refused together if two of them claim the same token (an
    n-vector word's tok_1 ... included)."""
    embeddings = [read_embedding(path, token) for path, token in files]
    owner: dict[str, Embedding] = {}
    for e in embeddings:
        for t in vector_tokens(e.token, len(e.vectors)):
            if t in owner:
                raise EmbeddingError(f"{e.file}: its token {t!r} is also {owner[t].file}'s; give one of them "
                                     "another token (FILE:TOKEN)")
            owner[t] = e
    return embeddings


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """One embedding file, in any of the three formats (see the module's docstring); its vectors (n, D) are
    checked to be floating point, n >= 1 and finite. EmbeddingError names the file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            stored, vectors, kind = _from_safetensors(path)
        elif path.suffix in PICKLE_SUFFIXES:
            stored, vectors, kind = _from_pickle(path)
        else:
            raise EmbeddingError(f"{path}: not an embedding file (.safetensors, or a pickle: "
                                 f"{', '.join(PICKLE_SUFFIXES)})")
    except CheckpointError as e:   # unreadable, or a pickle naming a global off the allowlist: its message
        raise EmbeddingError(str(e)) from None
    if not (isinstance(vectors, torch.Tensor) and vectors.is_floating_point() and vectors.ndim in (1, 2)
            and vectors.numel() > 0):
        what = (f"a {vectors.dtype} tensor of shape {tuple(vectors.shape)}" if isinstance(vectors, torch.Tensor)
                else type(vectors).__name__)
        raise EmbeddingError(f"{path}: its embedding is {what}; expected floating-point vectors (n, width)")
    vectors = vectors.detach().reshape(-1, vectors.shape[-1])                          # (n, D)
    try:   # a diverged training's save: every image with the word would be NaN
        check_finite({stored or "embedding": vectors}, source=str(path))
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    return Embedding(token=token or stored or path.stem, vectors=vectors, file=str(path), format=kind)


def _from_safetensors(path: Path) -> tuple[str | None, torch.Tensor, str]:
    tensors = read_safetensors(path)
    if "emb_params" in tensors:
        return None, tensors["emb_params"], "A1111 .safetensors"
    if {"clip_l", "clip_g"} <= tensors.keys():
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l and clip_g, one for each of SDXL's two text "
                             "encoders); this model has one text encoder")
    if len(tensors) == 1:
        (token, vectors), = tensors.items()
        return token, vectors, "diffusers"
    raise EmbeddingError(f"{path}: not a textual-inversion embedding: expected one tensor named by its token "
                         f"(diffusers) or emb_params (A1111); it holds {_names(tensors)}")


def _from_pickle(path: Path) -> tuple[str | None, torch.Tensor, str]:
    from diffusion.checkpoints.ckpt import read_checkpoint_full
    tree = read_checkpoint_full(path, inert=[PARAMETER_DICT])
    _check_plain(tree, path=path, where="the file")
    if isinstance(tree, torch.Tensor):              # a bare tensor (diffusers takes it with token=...)
        return None, tree, "diffusers"
    if not isinstance(tree, dict):
        raise EmbeddingError(f"{path}: holds a {type(tree).__name__}, not an embedding")
    if "string_to_param" in tree:                   # A1111, and rinongal's own files
        params, kind = tree["string_to_param"], "A1111 .pt"
        if getattr(params, "global_name", None) == PARAMETER_DICT:
            params, kind = (params.state or {}).get("_parameters"), "rinongal .pt"
        if not isinstance(params, dict) or len(params) != 1:
            found = _names(params) if isinstance(params, dict) else type(params).__name__
            raise EmbeddingError(f"{path}: string_to_param must hold one embedding (as A1111 requires); it holds "
                                 f"{found}")
        return None, next(iter(params.values())), kind
    if len(tree) == 1 and isinstance(next(iter(tree.values())), torch.Tensor):
        (token, vectors), = tree.items()
        return str(token), vectors, "diffusers"
    raise EmbeddingError(f"{path}: not a textual-inversion embedding: expected string_to_param (A1111) or one "
                         f"tensor named by its token (diffusers); it holds {_names(tree)}")


PLAIN = (str, int, float, bool, type(None))   # exact types: numpy's float64, a float subclass, is not plain


def _check_plain(value, *, path: Path, where: str) -> None:
    """Refuse what an embedding file has no reason to hold: anything but tensors, numbers, strings, None and
    containers of them, and the ParameterDict's placeholder (its pickled state checked the same way)."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, path=path, where=f"{where}, a key")
            _check_plain(item, path=path, where=f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set, frozenset):
        for i, item in enumerate(value):
            _check_plain(item, path=path, where=f"{where}[{i}]")
    elif getattr(value, "global_name", None) == PARAMETER_DICT and not value.args and not value.kwargs \
            and not value.items and not value.list_items:
        _check_plain(value.state, path=path, where=f"{where} (an nn.ParameterDict)")
    else:
        name = getattr(value, "global_name", None) or f"{type(value).__module__}.{type(value).__qualname__}"
        raise EmbeddingError(f"{path}: {where} is a {name}; an embedding file holds only tensors, numbers, "
                             "strings and plain containers (and an nn.ParameterDict), so it is refused")


def _names(tensors: dict) -> str:
    keys = [str(k) for k in tensors]
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "nothing"


# ---- adding the words to a model ---------------------------------------------------------------------------
def add_embeddings(text_encoder: nn.Module, tokenizer, embeddings: list[Embedding]) -> list[int]:
    """Teach the tokenizer every embedding's tokens and append their vectors to the text encoder's token
    embedding, the rows in the tokens' order (ids len(tokenizer), len(tokenizer) + 1, ...), as diffusers'
    load_textual_inversion does. Everything is checked before anything changes: a token the tokenizer has
    already (refused, as diffusers refuses it), vectors of another width than the text encoder's.
    Returns the new ids."""
    width = text_encoder.token_embedding.embedding_dim
    tokens, rows = [], []
    for e in embeddings:
        words = vector_tokens(e.token, len(e.vectors))
        known = [t for t in words if t in tokenizer]
        if known:
            raise EmbeddingError(f"{e.file}: the token {known[0]!r} is already in the tokenizer's vocabulary; give "
                                 "the embedding another token (FILE:TOKEN)")
        if e.vectors.shape[1] != width:
            raise EmbeddingError(f"{e.file}: its vectors are {e.vectors.shape[1]} wide, the text encoder's "
                                 f"token embedding {width} (an embedding made for another model: SD v1 is 768, "
                                 "SD 2 1024)")
        tokens += words
        rows.append(e.vectors)
    if not tokens:
        return []
    grow_token_embedding(text_encoder, torch.cat(rows), first=len(tokenizer))
    return tokenizer.add_tokens(tokens)


def grow_token_embedding(text_encoder: nn.Module, rows: torch.Tensor, *, first: int) -> None:
    """Rows (n, D) become the token embedding's rows first .. first + n - 1 (`first`: the tokenizer's next
    id; transformers' resize_token_embeddings(first + n), then the rows set). The config's vocab_size
    follows, so that the model can be saved and read back."""
    old = text_encoder.token_embedding.weight                                       # (V, D)
    if old.shape[0] < first:
        raise EmbeddingError(f"the text encoder has {old.shape[0]} token rows but its tokenizer gives ids up "
                             f"to {first - 1}: the model's vocabulary and tokenizer do not match")
    grown = nn.Embedding(first + rows.shape[0], old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([old[:first].detach(), rows.to(old)]))     # (V + n, D)
    grown.weight.requires_grad_(old.requires_grad)
    text_encoder.token_embedding = grown
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=first + rows.shape[0])


def remove_embeddings(text_encoder: nn.Module, embeddings: list[Embedding], *, first: int) -> list[Embedding]:
    """`add_embeddings` undone in the text encoder (the tokenizer keeps the words): the token embedding cut back
    to its `first` rows (the config's vocab_size too), so that the model saves as it was read. Returns the
    embeddings with the rows as they are now (trained along with the text encoder, say), in their order."""
    weight = text_encoder.token_embedding.weight.detach()                         # (V + n, D)
    out, at = [], first
    for e in embeddings:
        out.append(dataclasses.replace(e, vectors=weight[at:at + len(e.vectors)].clone()))
        at += len(e.vectors)
    kept = nn.Embedding(first, weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        kept.weight.copy_(weight[:first])
    kept.weight.requires_grad_(text_encoder.token_embedding.weight.requires_grad)
    text_encoder.token_embedding = kept
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=first)
    return out


# ---- prompts -----------------------------------------------------------------------------------------------
def expand_prompt(prompt: str, tokenizer) -> str:
    """diffusers' `maybe_convert_prompt`: each added word the prompt's tokens hold is replaced (str.replace,
    every occurrence) by itself and its other vectors' tokens, "tok" -> "tok tok_1 tok_2"; a single-vector
    word and a prompt without one stay as they are. The words are taken in the order the prompt first
    holds them (diffusers iterates a set, whose order varies between processes; the two agree whenever
    the order does not matter, which is always but for words that contain one another)."""
    if not getattr(tokenizer, "added_tokens", None):
        return prompt
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token in tokenizer.added_tokens:
            i, replacement = 1, token
            while f"{token}_{i}" in tokenizer.added_tokens:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


def expand_prompts(prompts: list[str], tokenizer) -> list[str]:
    return [expand_prompt(p, tokenizer) for p in prompts]


# ---- writing -----------------------------------------------------------------------------------------------
def save_embeddings(folder: str | Path, embeddings: list[Embedding]) -> list[Path]:
    """Each embedding in `folder` as its own diffusers file, named after its word's letters, digits, '-', '_'
    and '.' ("<cat-toy>" -> cat-toy.safetensors; words that name alike get their position added)."""
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", e.token).strip("._") or "embedding" for e in embeddings]
    names = [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [save_embedding(Path(folder) / f"{n}.safetensors", e.token, e.vectors) for n, e in zip(names, embeddings)]


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers' learned_embeds.safetensors: {token: (n, D)} with metadata {"format": "pt"}, as
    examples/textual_inversion's save_progress writes it (load_textual_inversion reads it); atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {token: vectors.detach().float().cpu().contiguous()}, {"format": "pt"})
    return path
