"""Prompts beside images, and the DreamBooth benchmark's prompt templates.

`prompts.jsonl` names the prompt of each generated image, one JSON object a line:

    {"image": "00000.png", "prompt": "a sks dog in the jungle"}

`image` is a file name in the folder the file describes. sample.py keeps one in its `samples/` folder
(`record_prompt`), and `python -m dreambooth.evaluate --prompts` reads it (`read_prompts`) for CLIP-T.

BENCHMARK is the DreamBooth dataset's protocol as published with the paper (benchmark_prompts.json, copied
from google/dreambooth's dataset/prompts_and_classes.txt, source and commit named in the file): 25 prompt
templates for objects, 25 for live subjects (dogs and cats; the first 10 and last 5 are shared), and the
class noun of each of the dataset's 30 subjects.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.files import atomic_write, read_json

PROMPTS_FILE = "prompts.jsonl"
BENCHMARK_FILE = Path(__file__).with_name("benchmark_prompts.json")
LIVE_CLASSES = ("dog", "cat")    # the dataset's README: "9 out of these subjects are live subjects (dogs and cats)"


def record_prompt(folder: Path, image_name: str, prompt: str) -> None:
    """Add `image_name`'s line to folder/prompts.jsonl; the file is rewritten whole (atomic_write), so a
    crash leaves the old file or the new one, never half a line."""
    path = Path(folder) / PROMPTS_FILE
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    line = json.dumps({"image": image_name, "prompt": prompt}, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(old + line + "\n", encoding="utf-8"))


def read_prompts(path: Path, *, flag: str = "--prompts") -> dict[str, str]:
    """{image file name: prompt} from a prompts.jsonl; ValueError naming the flag, file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e})") from None
    prompts: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {path}: line {number} is not JSON ({e.msg})") from None
        if (not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str)
                or not row["image"]):
            raise ValueError(f"{flag} {path}: line {number} is not an object with an \"image\" file name and a "
                             f"\"prompt\" (both strings): {line.strip()[:80]}")
        if row["image"] in prompts:
            raise ValueError(f"{flag} {path}: line {number} names {row['image']} a second time")
        prompts[row["image"]] = row["prompt"]
    if not prompts:
        raise ValueError(f"{flag} {path}: no prompts in it (one {{\"image\": ..., \"prompt\": ...}} a line)")
    return prompts


def drop_token(prompt: str, token: str) -> str:
    """The prompt without the identifier word: "a sks dog" -> "a dog" (whole words only)."""
    return " ".join(word for word in prompt.split() if word != token)


def benchmark() -> dict:
    return read_json(BENCHMARK_FILE)


def benchmark_prompts(token: str, class_noun: str, *, live: bool) -> list[str]:
    """The 25 prompts of the DreamBooth protocol for one subject: 'a sks dog in the jungle', ..."""
    templates = benchmark()["live_subject_prompts" if live else "object_prompts"]
    return [t.format(token=token, class_noun=class_noun) for t in templates]


def dataset_subject(name: str) -> tuple[str, bool] | None:
    """(class noun, live) of a DreamBooth dataset subject folder name ("dog6" -> ("dog", True)), else None."""
    noun = benchmark()["classes"].get(name)
    return None if noun is None else (noun, noun in LIVE_CLASSES)
