"""`python -m dreambooth.evaluate`: the DreamBooth paper's DINO, CLIP-I, CLIP-T and PRES for one subject
(Ruiz et al. 2023, sec. 4.1; definitions in dreambooth/metrics.py, the whole story in docs/evaluation.md).

    python -m dreambooth.evaluate --real data/dog --generated out/samples --prompts out/samples/prompts.jsonl \\
        --dino models/dino-vits16 --clip models/clip-vit-large-patch14 [--class_generated DIR] [--out scores.json]

    python -m dreambooth.evaluate benchmark --model runs/sks-dog --subject data/dog --class_noun dog --live \\
        --dino models/dino-vits16 --clip models/clip-vit-large-patch14

The first scores images already made (sample.py writes the prompts.jsonl beside its samples); `benchmark`
makes them first by the paper's protocol (dreambooth/benchmark.py: the dataset's 25 prompts, 4 images
each) and then scores them the same way. Both print a table and write the numbers as JSON.
Bad input (a folder without images, an image that does not decode, a prompts file that does not match
the folder, a classifier as --dino, a text-only CLIP as --clip) stops with one line naming the flag and
the file, before any model is loaded.
"""
from __future__ import annotations

import argparse
import sys

from dreambooth.scoring import (Inputs, UsageError, add_scoring_flags, check_models, check_scoring_flags, finish, images,
                                prompts_for, score)


# ---- the two commands -----------------------------------------------------------------------------------
def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreambooth.evaluate", description=__doc__.split("\n")[0],
                                epilog="python -m dreambooth.evaluate benchmark --help: generate by the paper's "
                                       "protocol, then score")
    p.add_argument("--real", required=True, help="the subject's real photos (the training images)")
    p.add_argument("--generated", required=True, help="the fine-tuned model's images (sample.py's samples/ folder)")
    p.add_argument("--prompts", required=True, help='JSON lines {"image": FILE_IN_GENERATED, "prompt": ...}, one per '
                                                    "generated image (sample.py writes samples/prompts.jsonl)")
    p.add_argument("--class_generated", default=None, help="the fine-tuned model's images of the plain class "
                                                           '("a dog"): adds PRES')
    add_scoring_flags(p)
    return p


def run_score(argv: list[str]) -> int:
    args = score_parser().parse_args(argv)
    from dreambooth.prompts import drop_token
    check_scoring_flags(args)
    real, generated = images(args.real, "--real"), images(args.generated, "--generated")
    prompts = prompts_for(generated, args.prompts, args.generated)
    class_generated = images(args.class_generated, "--class_generated") if args.class_generated else None
    dino, clip = check_models(args)
    if args.drop_token:
        prompts = [drop_token(p, args.drop_token) for p in prompts]
    finish(score(Inputs(real, generated, prompts, class_generated), args, dino, clip), args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from diffusion.pipeline import NonFiniteError
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["benchmark"]:
            from dreambooth.benchmark import run_benchmark
            return run_benchmark(argv[1:])
        return run_score(argv)
    except UsageError as e:
        print(f"python -m dreambooth.evaluate: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:   # benchmark: a model computing NaN makes no image to score
        print(f"python -m dreambooth.evaluate: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
