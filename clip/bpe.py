"""CLIP's byte-level BPE in plain Python, for reading: what clip/tokenizer.py asks the `tokenizers`
library to do, written out. Runtime keeps `tokenizers` (fast); tests check that both give the same
pieces on every prompt of tests/fixtures/clip/tokenizer_reference.json.

    cleanup   NFC, lower-case (special tokens are found before or after it, by their flag)
    split     special tokens, 's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of other
              non-space characters (clip/tokenizer.py's SPLIT_PATTERN, scanned by hand: Python's `re`
              has no \\p{L})
    bytes     each UTF-8 byte of a piece -> one printable character (bytes_to_unicode)
    merge     repeatedly merge the adjacent pair with the lowest rank in merges.txt (Sennrich et al.
              2016, "Neural Machine Translation of Rare Words with Subword Units", sec. 3.2); the last
              symbol of a piece carries "</w>"
"""
from __future__ import annotations

import re
import unicodedata

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode's White_Space property (what `\s` means to the Rust regex engine inside `tokenizers`)
WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200b)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _kind(c: str) -> str:
    if c in WHITE_SPACE:
        return "space"
    return {"L": "letter", "N": "digit"}.get(unicodedata.category(c)[0], "other")


def split(text: str) -> list[str]:
    """The pre-tokenizer: leftmost match, alternatives tried in SPLIT_PATTERN's order; whitespace dropped."""
    pieces, i = [], 0
    while i < len(text):
        found = next((s for s in (*SPECIAL, *CONTRACTIONS) if text.startswith(s, i)), None)
        kind = _kind(text[i])
        if found is None and kind == "space":
            i += 1
            continue
        if found is None:
            j = i + 1
            if kind != "digit":          # letters and "other" come in runs; a digit stands alone
                while j < len(text) and _kind(text[j]) == kind:
                    j += 1
            found = text[i:j]
        # the ByteLevel step splits again by GPT-2's pattern, which only changes a special token's
        # text met here (it is one piece to CLIP's pattern): "<|", "endoftext", "|>"
        pieces += ["<|", found[2:-2], "|>"] if found in SPECIAL else [found]
        i += len(found)
    return pieces


def _cut(text: str, specials) -> list[str]:
    """text split around the special tokens it holds: ["a ", "<|endoftext|>", " b"]."""
    return [t for t in re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if t] if specials else [text]


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Join every occurrence of `pair` in `symbols`, left to right (one BPE merge)."""
    out, k = [], 0
    while k < len(symbols):
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
            out.append(symbols[k] + symbols[k + 1])
            k += 2
        else:
            out.append(symbols[k])
            k += 1
    return out


class BPE:
    def __init__(self, merges: list[tuple[str, str]], *, normalized: dict[str, bool] | None = None):
        """normalized: per special token, whether it is found after the cleanup (so in any case) or in
        the raw text only; the shipped SD v1 flags by default (tokenizer_config.json can change them)."""
        self.normalized = normalized or {"<|startoftext|>": True, "<|endoftext|>": False}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_chars = bytes_to_unicode()
        self.cache: dict[str, list[str]] = {}

    def word(self, piece: str) -> list[str]:
        """One pre-tokenized piece -> its BPE symbols, merging the best-ranked adjacent pair until none is left."""
        if piece in self.cache:
            return self.cache[piece]
        chars = [self.byte_chars[b] for b in piece.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, float("inf")), k, p) for k, p in enumerate(zip(symbols, symbols[1:]))]
            rank, _, best = min(pairs)
            if rank == float("inf"):
                break
            symbols = merge_pair(symbols, best)
        self.cache[piece] = symbols
        return symbols

    def tokenize(self, prompt: str) -> list[str]:
        """The BPE pieces of a prompt, as CLIPTokenizer.tokenize gives them (no start/end tokens)."""
        raw = [s for s, n in self.normalized.items() if not n]
        cleaned = [s for s, n in self.normalized.items() if n]
        out = []
        for part in _cut(prompt, raw):
            if part in raw:
                out.append(part)
                continue
            part = unicodedata.normalize("NFC", part)   # (whitespace runs -> one space: split drops them anyway)
            for piece in _cut("".join(c.lower() for c in part), cleaned):  # char by char: a final sigma stays σ
                out += [piece] if piece in cleaned else [sym for p in split(piece) for sym in self.word(p)]
        return out
