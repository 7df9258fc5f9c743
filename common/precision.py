"""Precision names, the one map from them to dtypes, and the one autocast context every script uses.

The scripts speak of precision in three spellings, all mapped here:
- "fp32" / "bf16" / "fp16": the dtype names runs record and `sample.py --precision` takes;
- "no" / "bf16" / "fp16": diffusers' and accelerate's `--mixed_precision`, which the training
  scripts take (`MIXED_PRECISION` maps them to the dtype names).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}   # --mixed_precision -> dtype name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp32: nothing; bf16/fp16: torch.autocast on `device` (weights stay in their dtype, matmuls and
    convolutions run in the low precision). fp16 on a CPU runs, but slowly."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(DTYPES)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
