"""`python -m porting compare REFERENCE OTHER`: two traces side by side, key by key, in forward order.

For each key both files hold: the max |a - b| and that divided by max |a| of the reference (the
first file), so one tolerance fits a layer norm's output and a logit alike. Activations of equal size
but different shape (a (T, D) position embedding against transformers' (1, T, D)) are compared as
flat vectors and marked. The first key beyond --rtol is marked: it is where a port first goes wrong.

A backward trace's `loss` and `grad:<key>` gradients (after the module outputs, in backward order) are
lines like any other, with one difference: a gradient is held to the largest reference value among
its module's gradients (`grad:x.to_k.bias` with `grad:x.to_k.weight`), not its own. The bias of an
attention key projection has gradient zero in exact arithmetic (softmax ignores a shift every key
shares), so two correct implementations hold only rounding noise there: 1e-10 to 3e-8 on the tiny
fixtures, up to 1.4 of each other's largest value, which its own scale would flag in every port.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from porting.components import TraceError
from porting.trace import GRAD


@dataclass
class Line:
    key: str
    max_abs: float
    rel: float
    note: str = ""


@dataclass
class Result:
    lines: list[Line] = field(default_factory=list)
    only_reference: list[str] = field(default_factory=list)
    only_other: list[str] = field(default_factory=list)
    beyond: list[str] = field(default_factory=list)


def read_trace(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors and their forward order (from the trace's metadata; file order otherwise)."""
    if not Path(path).is_file():
        what = "no such file" if not Path(path).exists() else "is a folder" if Path(path).is_dir() else \
            "is not a regular file"
        raise TraceError(f"{path}: {what}, not a trace (.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:
        raise TraceError(f"{path}: not a readable safetensors file ({e})") from None
    order = [k for k in json.loads(meta.get("order", "[]")) if k in tensors]
    return tensors, order + sorted(set(tensors) - set(order))


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype and values in order: two layers are bit for bit the same where these
    are (shapes are `compare`'s to check: it accepts the same values flat, as a (1, 7, 32) position
    embedding against a (7, 32) one). A bf16 trace is only reproducible on the kind of CPU that made it;
    tests/fixtures/traces keeps each kind's digests, so the test asks bit-identity there without a
    trace file per kind."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype} ".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gradient_scales(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """grad:<module>.<name> -> the largest |value| among the module's gradients (see above)."""
    largest: dict[str, float] = {}
    for key, x in tensors.items():
        if key.startswith(GRAD):
            module = key.rsplit(".", 1)[0]
            largest[module] = max(largest.get(module, 0.0), x.double().abs().max().item() if x.numel() else 0.0)
    return {key: largest[key.rsplit(".", 1)[0]] for key in tensors if key.startswith(GRAD)}


def compare(reference: str | Path, other: str | Path, *, rtol: float = 1e-4) -> Result:
    a, order_a = read_trace(reference)
    b, order_b = read_trace(other)
    shared = [k for k in order_a if k in b]
    if not shared:
        raise TraceError(f"{reference} and {other} share no key (e.g. {order_a[:2]} vs {order_b[:2]}): "
                         "were they traced with the same --names?")
    result = Result(only_reference=[k for k in order_a if k not in b], only_other=[k for k in order_b if k not in a])
    module_scale = gradient_scales(a)
    for key in shared:
        x, y = a[key].double(), b[key].double()
        note = ""
        if x.shape != y.shape:
            if x.numel() != y.numel():
                result.lines.append(Line(key, float("inf"), float("inf"), f"shape {tuple(x.shape)} vs {tuple(y.shape)}"))
                result.beyond.append(key)
                continue
            note = f"flat: {tuple(x.shape)} vs {tuple(y.shape)}"
            x, y = x.flatten(), y.flatten()
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        scale = module_scale.get(key, x.abs().max().item() if x.numel() else 0.0)
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if not (rel <= rtol):   # NaN counts as beyond
            result.beyond.append(key)
        result.lines.append(Line(key, diff, rel, note))
    return result


def report(result: Result, *, rtol: float) -> str:
    first = result.beyond[0] if result.beyond else None
    width = max(len(line.key) for line in result.lines)
    out = [f"{'key':<{width}}  {'max abs diff':>12}  {'rel':>9}"]
    for line in result.lines:
        mark = "  <-- first beyond rtol" if line.key == first else ("  beyond" if line.key in result.beyond else "")
        note = f"  ({line.note})" if line.note else ""
        out.append(f"{line.key:<{width}}  {line.max_abs:12.3e}  {line.rel:9.2e}{note}{mark}")
    for title, keys in (("only in the reference", result.only_reference), ("only in the other", result.only_other)):
        if keys:
            out.append(f"{title} ({len(keys)}): {', '.join(keys)}")
    grads = sum(line.key.startswith(GRAD) for line in result.lines)
    out.append(f"{len(result.lines)} shared keys" + (f" ({grads} gradients)" if grads else "")
               + f", {len(result.beyond)} beyond rtol {rtol:g}"
               + (f"; first: {first}" if first else ""))
    return "\n".join(out)
