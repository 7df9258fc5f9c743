"""CLIP-L text encoding (batch 2 x 77, fp32 and bf16) and tokenising 10,000 prompts, ours against transformers.

    flock /tmp/bench.lock .venv-dev/bin/python bench/clip.py [--repeats 15] [--prompts 10000]

Both text encoders hold the same random full-size ViT-L/14 weights (transformers' init, copied into
ours through clip/weights.py), run under torch.inference_mode, and are timed alternately so that
load from other processes hits both alike. The tokenisers are ours (shipped vocabulary) and
transformers' CLIPTokenizer on the same vocab.json/merges.txt with SD v1's tokenizer_config.json,
both returning a (B, 77) LongTensor. Prints medians and ratios reference / ours (> 1: ours is faster).
Without transformers installed, only our side runs and the script says so.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip.text_model import CLIPTextConfig, CLIPTextModel  # noqa: E402
from clip.tokenizer import CLIPTokenizer  # noqa: E402
from clip.weights import text_encoder_state_dict  # noqa: E402
from common.state_dict import load_strict  # noqa: E402

from tools import reference_models as reference  # noqa: E402

TRANSFORMERS = reference.version("transformers")   # None when it is not installed

WORDS = ("a photo of sks dog in a bucket, portrait of a woman by greg rutkowski, highly detailed, 8k, "
         "trending on artstation, café, 🐶, 東京, it's, (masterpiece:1.2), [blurry], don't, 1920x1080").split()


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def race(fns: dict, *, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, runs interleaved in alternating order (a b, b a, a b, ...)."""
    for fn in fns.values():
        timed(fn, warmup)
    runs = {name: [] for name in fns}
    for i in range(repeats):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            runs[name] += timed(fns[name], 1)
    return {name: statistics.median(r) for name, r in runs.items()}


def report(what: str, medians: dict[str, float], unit: str = "ms") -> None:
    scale = 1e3 if unit == "ms" else 1.0
    line = f"{what:34s} ours {medians['ours'] * scale:8.2f} {unit}"
    if "transformers" in medians:
        line += (f"   transformers {medians['transformers'] * scale:8.2f} {unit}"
                 f"   ratio {medians['transformers'] / medians['ours']:.2f}x")
    print(line, flush=True)


def bench_encoder(repeats: int) -> None:
    config = CLIPTextConfig.vit_l14()
    ours = CLIPTextModel(config).eval()
    ids = CLIPTokenizer.from_pretrained()(["a photo of sks dog", "a highly detailed portrait, 8k"])  # (2, 77)
    ref = None
    if TRANSFORMERS:
        torch.manual_seed(0)
        ref = reference.clip_text_model({k: getattr(config, k) for k in config.__dataclass_fields__}).eval()
        state_dict = {f"text_model.{k}": v for k, v in ref.state_dict().items()}
        load_strict(ours, text_encoder_state_dict(state_dict, source="transformers"), source="transformers")
    for dtype in (torch.float32, torch.bfloat16):
        ours_d = ours.to(dtype)
        fns = {"ours": lambda: ours_d(ids)}
        if ref is not None:
            ref_d = ref.to(dtype)
            fns["transformers"] = lambda: ref_d(ids)
        with torch.inference_mode():
            if ref is not None:
                diff = (ours_d(ids).last_hidden_state.float() - ref_d(ids).last_hidden_state.float()).abs().max()
                print(f"  {dtype}: max |ours - transformers| last_hidden_state = {diff:.2e}")
            report(f"encode 2x77 {str(dtype).removeprefix('torch.')}", race(fns, repeats=repeats))


def bench_tokenizer(n: int, repeats: int) -> None:
    batch = prompts(n)
    ours = CLIPTokenizer.from_pretrained()
    fns = {"ours": lambda: ours(batch)}
    if TRANSFORMERS:
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_vocab_files(tmp)
            sd_config = ROOT / "tests" / "fixtures" / "clip" / "tokenizer_sd_v1" / "tokenizer_config.json"
            Path(tmp, "tokenizer_config.json").write_text(sd_config.read_text())
            ref = reference.clip_tokenizer(tmp)
        fns["transformers"] = lambda: ref(batch, padding="max_length", max_length=77, truncation=True,
                                          return_tensors="pt").input_ids
        assert torch.equal(fns["ours"](), fns["transformers"]()), "tokenisers disagree on the bench prompts"
    report(f"tokenise {n} prompts", race(fns, repeats=repeats, warmup=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prompts", type=int, default=10_000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; reference: "
          + (f"transformers {TRANSFORMERS}" if TRANSFORMERS else "transformers not installed (ours only)"))
    bench_encoder(args.repeats)
    bench_tokenizer(args.prompts, max(3, args.repeats // 3))


if __name__ == "__main__":
    main()
