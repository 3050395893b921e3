"""The frozen base weights' products at a reduced matmul precision, everything else exact (opt-in).

In LoRA training the frozen weights appear only in products: x W^T in forward and g W for the
input gradient in backward, most of a step's arithmetic. torch's
`set_float32_matmul_precision("medium")` runs fp32 products with bf16 operands and fp32
accumulation (AMX on recent Xeons, 2.3-4.5x the fp32 speed there; TF32 on NVIDIA GPUs), but it
is process-wide: on a CPU it also makes `scaled_dot_product_attention` 1.5-2x slower, and the
rank-r LoRA products gain nothing (benchmarks/matmul_precision.py). `frozen_matmul_precision(level)` asks for `level` in the fast
path's frozen-weight products only (`lorakit.fast.kernels`); attention, norms, the adapters' own
products and the optimizer stay as they are. Each autograd node takes the level in force when
its forward ran, so backward (on a GPU, another thread) uses the same one. Under gradient
checkpointing backward runs forward again: call backward inside the block too (the trainer
runs whole steps inside it).

While such a product runs, torch's setting is switched for the whole process: another thread
doing matmuls at that moment gets the reduced precision too.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

LEVELS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's names

_level: contextvars.ContextVar[str] = contextvars.ContextVar("lorakit_frozen_matmul_precision", default="highest")


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"frozen_matmul_precision: {level!r} is not one of {', '.join(LEVELS)}")
    return level


@contextmanager
def frozen_matmul_precision(level: str) -> Iterator[None]:
    """Run the frozen base weights' products in training at `level` ("highest": exact fp32, the default;
    "high"/"medium": as torch.set_float32_matmul_precision defines them) inside this block."""
    token = _level.set(check_level(level))
    try:
        yield
    finally:
        _level.reset(token)


def frozen_level(work: torch.dtype | None) -> str:
    """The level for frozen-weight products computed in `work` in a node whose forward runs now:
    reduced only for fp32 products (the setting concerns fp32; 16-bit products are already low)."""
    level = _level.get()
    return level if work == torch.float32 else "highest"


_EXACT = nullcontext()


def products(level: str) -> AbstractContextManager:
    """torch's matmul precision at `level` for the block ("highest": leave it as it is, at no cost)."""
    return _EXACT if level == "highest" else _reduced(level)


@contextmanager
def _reduced(level: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
