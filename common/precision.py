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
import os

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
    """Whether this CPU computes `dtype` matmuls and convolutions at speed, as torch's oneDNN probes report
    it (bf16: any AVX-512 CPU, where oneDNN emulates what AVX512-BF16 or AMX would do in a few
    instructions; fp16: AVX512-FP16 or AMX-FP16). Without, torch emulates them slowly: on an AVX2 CPU a
    1024x1024 bf16 matmul took 2.3 s against 20 ms in fp32. (Which units compute it: `cpu_kind`.)"""
    if dtype == torch.float32:
        return True
    try:
        check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
        return bool(check())
    except (AttributeError, RuntimeError, KeyError):   # a torch without these probes: assume it is fine
        return True


# oneDNN's instruction sets, lowest first, as its ONEDNN_MAX_CPU_ISA variable names them (a cap on what
# it uses; unset, it uses all the CPU has). AVX10_1_512 is AVX512_CORE_FP16's newer name, and so on.
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
               "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16")


def _onednn_may_use(isa: str) -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    return cap not in ONEDNN_ISAS or ONEDNN_ISAS.index(cap) >= ONEDNN_ISAS.index(isa)


def cpu_kind() -> str:
    """The kernels this CPU runs, as far as they decide the last bits of a result: torch's vector width
    (`get_cpu_capability()`: "AVX2", "AVX512"; ATEN_CPU_CAPABILITY lowers it) and the low-precision units
    oneDNN computes with ("bf16": AVX512-BF16 instructions; "fp16": AVX512-FP16; "AMX": tile matmuls;
    ONEDNN_MAX_CPU_ISA withholds them). E.g. "AVX2" (bf16 and fp16 emulated in fp32), "AVX512" (Intel
    Skylake to Cascade Lake: bf16 emulated with AVX-512), "AVX512+bf16" (AMD Zen 4), "AVX512+bf16+fp16+AMX"
    (Intel Sapphire Rapids).

    Not `native_on_cpu`: torch reports bf16 as supported on every AVX-512 CPU, where oneDNN emulates what
    the CPU lacks, fast but in other roundings. The same program gives the same bits on two CPUs of one
    kind. Across kinds, fp32 results agree to rounding (~1e-6 relative), but bf16 and fp16 ones do not:
    at bf16's 8-bit mantissa a few sampler steps turn other sums into images 10-24/255 apart
    (tests/test_sample.py says how far). Fixtures that depend on it record the kind they were made on.
    With ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, an AVX-512 CPU computes as the AVX2 kind does,
    bit for bit (the AVX2 fixtures pass so on an AMD Zen 4)."""
    probe = torch.cpu
    kind = [torch.backends.cpu.get_cpu_capability()]
    try:
        amx = probe._is_amx_tile_supported() and _onednn_may_use("AVX512_CORE_AMX")
        if (probe._is_avx512_bf16_supported() or amx) and _onednn_may_use("AVX512_CORE_BF16"):
            kind.append("bf16")
    except AttributeError:                   # a torch without these probes: the capability alone
        return kind[0]
    if native_on_cpu(torch.float16):         # AVX512-FP16 (oneDNN's own probe, which honours the cap)
        kind.append("fp16")
    if amx:
        kind.append("AMX")
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
