"""Precision names, the one map from them to dtypes, and the one autocast context every script uses.

Two ways to run a model in low precision, both used here:
- half-precision weights: the weights themselves are bf16 or fp16 and every operation runs in that
  dtype, as diffusers' `torch_dtype=torch.bfloat16` and transformers' `torch_dtype` (half the memory,
  no casts). `sample.py --precision bf16|fp16`, DreamBooth's `--prior_generation_precision`.
- autocast (mixed precision): fp32 weights, and `torch.autocast` runs matmuls and convolutions in the
  low dtype. Training uses it (fp32 master weights: `--mixed_precision`, as accelerate), and
  `sample.py --precision autocast` (CompVis's word for it).

The scripts speak of precision in these spellings, all mapped here:
- "fp32" / "bf16" / "fp16": dtype names, as runs record them (`DTYPES`);
- "full" / "autocast": CompVis's txt2img `--precision` (`full` is fp32);
- "no" / "bf16" / "fp16": diffusers' and accelerate's `--mixed_precision`, which the training
  scripts take (`MIXED_PRECISION` maps them to the dtype names).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}   # --mixed_precision -> dtype name
SAMPLING_PRECISIONS = ("fp32", "full", "bf16", "fp16", "autocast")  # sample.py --precision


def autocast_dtype_name(device: torch.device) -> str:
    """The dtype `--precision autocast` runs in: torch.autocast's own default for the device (bf16 on
    a CPU, fp16 on a GPU, as CompVis's scripts ran it)."""
    return "bf16" if device.type == "cpu" else "fp16"


def sampling_precision(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """sample.py's --precision -> (the weights' dtype, the autocast dtype name or "fp32" for none)."""
    if name not in SAMPLING_PRECISIONS:
        raise ValueError(f"--precision {name}: choose one of {', '.join(SAMPLING_PRECISIONS)}")
    if name == "autocast":
        return torch.float32, autocast_dtype_name(device)
    return DTYPES["fp32" if name == "full" else name], "fp32"


def check_device_runs(dtype: torch.dtype, device: torch.device, *, flag: str) -> None:
    """Refuse, before any model is loaded, a dtype the device cannot compute in (fp16 matmuls on an old
    CPU build, bf16 on a GPU without it): one tiny matmul and convolution in that dtype must run."""
    if dtype == torch.float32:
        return
    name = next(k for k, v in DTYPES.items() if v == dtype)
    try:
        x = torch.ones(2, 2, 4, 4, dtype=dtype, device=device)
        torch.nn.functional.conv2d(x, torch.ones(2, 2, 3, 3, dtype=dtype, device=device), padding=1)
        x.flatten(1) @ torch.ones(32, 2, dtype=dtype, device=device)
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError("torch.cuda.is_bf16_supported() is False")
    except RuntimeError as e:
        raise ValueError(f"{flag} {name}: the device {device} cannot compute in {name} here ({e}); "
                         "use fp32") from None


def native_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` matmuls and convolutions in hardware (bf16: AVX512-BF16 or AMX;
    fp16: AVX512-FP16 or AMX-FP16), as oneDNN reports it. Without, torch emulates them: on an AVX2 CPU
    a 1024x1024 bf16 matmul took 2.3 s against 20 ms in fp32."""
    if dtype == torch.float32:
        return True
    try:
        check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
        return bool(check())
    except (AttributeError, RuntimeError, KeyError):   # a torch without these probes: assume it is fine
        return True


def cpu_kind() -> str:
    """The kernels this CPU runs, as far as they decide the last bits of a result: torch's vector width
    (`get_cpu_capability()`: "AVX2", "AVX512", ...) and which low-precision units oneDNN uses ("bf16",
    "fp16": `native_on_cpu`; "AMX": tile matmuls). E.g. "AVX2" (bf16 and fp16 emulated), "AVX512+bf16"
    (AMD Zen 4), "AVX512+bf16+fp16+AMX" (Intel Sapphire Rapids).

    The same program gives the same bits on two CPUs of one kind. Across kinds, fp32 results agree to
    rounding (~1e-6 relative), but bf16 and fp16 ones do not: an emulated bf16 matmul rounds its inputs
    and sums in fp32 with one vector width, a native one sums in another order, and at bf16's 8-bit
    mantissa a few steps of a sampler turn that into images 10-24/255 apart (tests/test_sample.py says
    how far). Fixtures that depend on it record the kind they were made on."""
    kind = [torch.backends.cpu.get_cpu_capability()]
    kind += [name for name in ("bf16", "fp16") if native_on_cpu(DTYPES[name])]
    try:
        if torch._C._cpu._init_amx():        # asks the kernel for the AMX tile state; False without AMX
            kind.append("AMX")
    except (AttributeError, RuntimeError):
        pass
    return "+".join(kind)


def slow_precision_warning(dtype: torch.dtype, device: torch.device, *, flag: str) -> str | None:
    """A line for stderr when `dtype` runs but only emulated on this CPU (about 100x slower than fp32)."""
    if device.type != "cpu" or native_on_cpu(dtype):
        return None
    name = next(k for k, v in DTYPES.items() if v == dtype)
    return (f"warning: {flag} {name}: this CPU has no {name} instructions (oneDNN reports none), so torch "
            f"emulates {name} here, about 100x slower than fp32; fp32 is the fast choice on this machine")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp32: nothing; bf16/fp16: torch.autocast on `device` (weights stay in their dtype, matmuls and
    convolutions run in the low precision). fp16 on a CPU runs, but slowly."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(DTYPES)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
