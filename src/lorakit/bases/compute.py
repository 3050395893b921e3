"""Which dtype a product of 16-bit operands runs in on a device.

GPUs and CPUs with 16-bit matrix instructions (AMX, AVX512-BF16/FP16) multiply bf16/fp16
natively. Other CPUs emulate them: on an AVX2-only EPYC a (1024, 576) x (576, 1536) bf16
product took 121-137 ms against 19 ms in fp32, and g W with W stored (out, in) 1,150 ms
(benchmarks/matmul_precision.py). There a 16-bit base keeps its weights in 16 bits (the
memory) and multiplies in fp32 (the speed): the operands are the same 16-bit values, exact in
fp32, and the sum accumulates in fp32 as a native bf16 kernel does; only the order of the
additions differs.
"""

from __future__ import annotations

import functools

import torch

_NATIVE_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def product_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype products with a `dtype` weight on `device` run in: `dtype` itself, or fp32 where
    that device only emulates it."""
    if dtype not in _NATIVE_FLAGS or device.type != "cpu":
        return dtype
    return dtype if _cpu_has(_NATIVE_FLAGS[dtype]) else torch.float32


@functools.cache
def _cpu_has(flags: tuple[str, ...]) -> bool:
    return bool(set(flags) & cpu_flags())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_AUTOCAST_CAST = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts a linear's operands from


def autocast_compute_dtype(dtype: torch.dtype, autocast: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a product with a `dtype` weight runs in under torch.autocast to `autocast`:
    autocast's dtype (it casts fp32 and 16-bit operands of a linear to it), in fp32 where the
    device only emulates it; other weights (fp64) keep their own rule."""
    return product_dtype(autocast if dtype in _AUTOCAST_CAST else dtype, device)


def named_dtype(value: torch.dtype | str | None, allowed: dict[str, torch.dtype]) -> torch.dtype | None:
    """`value` as one of the `allowed` dtypes (a torch.dtype, or its name with or without "torch.");
    None stays None. LookupError for anything else (the caller names the option in its message)."""
    if value is None or (isinstance(value, torch.dtype) and value in allowed.values()):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in allowed:
        return allowed[value.removeprefix("torch.")]
    raise LookupError(value)
