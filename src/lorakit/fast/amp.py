"""The fused kernels under torch.autocast (transformers' Trainer and TRL with bf16=True / fp16=True).

Inside an autograd node autocast would cast each product's operands on its own, so the kernels'
in-place updates (`addmm_`) would meet mixed dtypes ("self and mat2 must have the same dtype").
Instead a kernel called under autocast runs with autocast off and does once, at its entry, what
autocast does to a linear layer: its input becomes the autocast dtype (the cast is an ordinary
autograd op, so the input's gradient comes back in its own dtype), and a frozen base stored in
fp32/fp16/bf16 multiplies in that dtype (`bases.compute.autocast_compute_dtype`: widened to fp32
only where the device emulates it, as for 16-bit bases). The outputs are in the autocast dtype,
as autocast's linear gives them; the adapters' own rank-r products stay in the adapters' dtype
(fp32, as PEFT's autocast_adapter_dtype keeps them), and backward runs with autocast off too.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor

from ..bases import FrozenBase
from ..bases.compute import autocast_compute_dtype
from .recompute import Kept


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast casts products to on `device` now, or None outside autocast."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def autocast_off(device: torch.device):
    """A block with autocast off on `device` (nothing to do where it is already off)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else nullcontext()


def exact_backward(backward: Callable) -> Callable:
    """An autograd node's backward run with autocast off (`loss.backward()` called inside an
    autocast block runs a CPU node's backward in that block)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next((g.device for g in grads if isinstance(g, Tensor)), None)
        with autocast_off(device) if device is not None else nullcontext():
            return backward(ctx, *grads)
    return run


def base_under_autocast(base: FrozenBase, dtype: torch.dtype) -> FrozenBase:
    """The base as autocast would run it: one that multiplies in `autocast_compute_dtype` (a
    dense base's view with that compute dtype), or the base itself where that changes nothing
    or its kind keeps its own compute dtype (quantized bases)."""
    work = autocast_compute_dtype(base.dtype, dtype, base.device)
    computing_in = getattr(base, "computing_in", None)
    if work == base.compute_dtype() or computing_in is None:
        return base
    return computing_in(work)


def kept_under_autocast(keep: Kept | None, dtype: torch.dtype) -> Kept | None:
    """`keep` whose remade input is cast as the kernel's input was (the same values as forward's)."""
    if keep is None:
        return None
    remake = keep.remake
    return Kept(lambda source: remake(source).to(dtype), keep.source)
