"""python -m porting trace | compare | mapping  (see porting/__init__.py and docs/porting.md)."""
from __future__ import annotations

import argparse
import math
import sys

from common.state_dict import CheckpointError


def tolerance(text: str) -> float:
    """argparse type of --rtol: a finite number >= 0 (NaN would pass no comparison, and call every key of
    a trace compared with itself beyond it)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m porting", description="Layer-by-layer tools for porters.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="every module's output of one component, under the checkpoint's names")
    t.add_argument("--model", required=True, help="a diffusers SD folder, an SD single file, a CLIP or ViT folder/file")
    t.add_argument("--component", required=True, help="vit, text_encoder, clip_vision, unet, vae_encoder or vae_decoder")
    t.add_argument("--inputs", required=True, help="safetensors with the forward's inputs by name")
    t.add_argument("--out", required=True, help="the .safetensors trace to write")
    t.add_argument("--precision", default="fp32", help="fp32 or bf16")
    t.add_argument("--config", default=None, help="configs for a single file (a diffusers folder, or a folder with config.json)")
    t.add_argument("--names", default="checkpoint", help="checkpoint (the file's module names) or ours")
    t.add_argument("--backward", action="store_true",
                   help="also the loss mean((output - target)^2), target from --inputs, and each parameter's gradient as grad:<key>")
    c = sub.add_parser("compare", help="two traces, key by key, in forward order")
    c.add_argument("reference")
    c.add_argument("other")
    c.add_argument("--rtol", type=tolerance, default=1e-4, help="max |diff| / max |reference| allowed per key")
    m = sub.add_parser("mapping", help="a layout's key table as TSV")
    m.add_argument("--layout", required=True)
    args = parser.parse_args(argv)

    from porting.components import TraceError
    try:
        if args.command == "trace":
            from porting.trace import GRAD, run_trace
            tensors = run_trace(model=args.model, component=args.component, inputs=args.inputs, out=args.out,
                                precision=args.precision, names=args.names, config_dir=args.config,
                                backward=args.backward)
            grads = sum(k.startswith(GRAD) for k in tensors)
            print(f"wrote {args.out}: {len(tensors) - grads - args.backward} module outputs"
                  + (f", the loss {tensors['loss'].item():.6g} and {grads} gradients" if args.backward else ""))
            return 0
        if args.command == "compare":
            from porting.compare import compare, report
            result = compare(args.reference, args.other, rtol=args.rtol)
            print(report(result, rtol=args.rtol))
            return 1 if result.beyond else 0
        from porting.mapping import table_tsv
        print(table_tsv(args.layout), end="")
        return 0
    except (TraceError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
