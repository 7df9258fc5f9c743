"""clip/bpe.py, the plain-Python BPE for reading, gives the runtime tokenizer's pieces on every fixture prompt."""
from __future__ import annotations

import json
from pathlib import Path

from clip.bpe import BPE
from clip.tokenizer import CLIPTokenizer

REF = json.loads((Path(__file__).parent / "fixtures" / "clip" / "tokenizer_reference.json").read_text(encoding="utf-8"))


def test_plain_bpe_equals_the_tokenizers_path_on_every_prompt():
    runtime = CLIPTokenizer.from_pretrained()
    plain = BPE(runtime.merges)
    bad = [p for p in REF["prompts"] if plain.tokenize(p) != runtime.tokenize(p)]
    assert not bad, f"{len(bad)} of {len(REF['prompts'])} prompts differ, e.g. {bad[:3]!r}"
    ids = [[runtime.vocab[t] for t in plain.tokenize(p)][:75] for p in REF["prompts"]]
    assert [[49406, *i, 49407] for i in ids] == REF["input_ids_unpadded"]
