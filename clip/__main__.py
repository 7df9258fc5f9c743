"""Print CLIP token ids and token strings, one JSON line per prompt, for checking another tokenizer.

    python -m clip "a photo of sks dog" "a dog"             # the shipped vocabulary, padded to 77
    python -m clip --model path/to/sd/tokenizer "a dog"     # a tokenizer folder or tokenizer.json
    python -m clip --no_pad "a dog"                         # start + tokens + end, no padding
"""
from __future__ import annotations

import argparse
import json
import sys

from clip.tokenizer import CLIPTokenizer, TokenizerFileError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip", description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="+", help="one or more prompts (quote each)")
    parser.add_argument("--model", default=None, help="tokenizer folder (vocab.json + merges.txt) or tokenizer.json; "
                                                      "default: the CLIP vocabulary shipped in clip/")
    parser.add_argument("--no_pad", action="store_true", help="show the unpadded ids")
    parser.add_argument("--max_length", type=int, default=None, help="sequence length (default: the tokenizer's, 77)")
    args = parser.parse_args(argv)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.model)
    except TokenizerFileError as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 2
    max_length = args.max_length or tokenizer.model_max_length
    rows = tokenizer(args.prompts, padding=not args.no_pad, max_length=max_length)
    for prompt, ids in zip(args.prompts, rows):
        ids = [int(i) for i in ids]
        print(json.dumps({"prompt": prompt, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)},
                         ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
