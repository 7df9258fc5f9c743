"""A CLIP-format BPE vocabulary for the tiny world: every byte, plus one token per world word.

CLIP's real vocabulary has 49,408 tokens; an embedding table that size would be most of the tiny
model's weights and almost all of it untrained. This one keeps CLIP's format exactly, so the same
`clip.tokenizer.CLIPTokenizer` reads its `vocab.json` + `merges.txt`:

    ids 0..255     the 256 byte characters (CLIP's byte-to-unicode table), as word pieces
    ids 256..511   the same characters with "</w>" (the last piece of a word)
    ids 512..      the merges BPE training learns on the world's word list, until every world
                   word is one token ("r e" -> "re", ..., "re d</w>" -> "red</w>")
    last two       <|startoftext|>, <|endoftext|> (as in CLIP: the special tokens come last)

Any other text still tokenises, byte by byte ("zebra" -> z e b r a</w>), as CLIP would spell an
unknown word in pieces. "sks" is in the vocabulary but in no caption: DreamBooth's rare token, an
embedding the model has never been taught to mean anything.
"""
from __future__ import annotations

import re

from clip.bpe import merge_pair
from clip.tokenizer import END_OF_WORD, END_TOKEN, START_TOKEN, CLIPTokenizer, byte_to_unicode
from world.captions import TEMPLATES, WHERE
from world.scene import COLOURS, POSITIONS, SHAPES, SIZES

RARE_TOKEN = "sks"      # the DreamBooth identifier: a token in the vocabulary that no caption uses
MAX_LENGTH = 20         # start + 18 tokens + end; the longest caption is 13 tokens


def world_words() -> list[str]:
    """Every word a caption can contain, then the rare token, in a fixed order."""
    text = " ".join([*TEMPLATES, *WHERE.values(), *COLOURS, *SHAPES, *SIZES, *POSITIONS, "an"])
    words = re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text))
    return list(dict.fromkeys(words)) + [RARE_TOKEN]


def build_tokenizer(words: list[str] | None = None, *, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """The world's tokenizer: bytes + one merge chain per word (see the module docstring)."""
    words = world_words() if words is None else words
    chars = list(byte_to_unicode().values())                  # 256 printable stand-ins for the bytes
    tokens = chars + [c + END_OF_WORD for c in chars]         # (512,)
    # BPE training (Sennrich et al. 2016, Algorithm 1) on the word list, each word counted once:
    # merge the most frequent adjacent pair (ties: the first met) until every word is one token.
    # Applying the merges in this order to a word then rebuilds it exactly the same way.
    spelled = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words]   # "red" -> r, e, d</w>
    merges: list[tuple[str, str]] = []
    while any(len(pieces) > 1 for pieces in spelled):
        counts: dict[tuple[str, str], int] = {}
        for pieces in spelled:
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=counts.get)                    # max keeps the first of equal counts
        merges.append(best)
        tokens.append(best[0] + best[1])
        spelled = [merge_pair(pieces, best) for pieces in spelled]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, source="world vocabulary")
