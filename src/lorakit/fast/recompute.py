"""Keeping a norm's input instead of its output for LoRA's backward, and remaking the output there.

In a Llama block the RMSNorm before attention and the one before the MLP keep their fp32 input
for their own backward. The LoRA layers reading their output (q/k/v, the MLP) keep that output
only for the A-gradient: one more (tokens, hidden) tensor per norm. `tap(norm)` makes a norm
remember its last input and output (weakly); `source(norm, x)` says whether x is that output,
unchanged since, and returns the norm's forward and input, from which backward remakes x exactly
(same module, same input: the same floating-point operations). Only fp32, where the input is
kept anyway; in bf16 the norm keeps an fp32 copy and keeping its input would save nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

_IO = "_lorakit_io"  # on a tapped norm: [weakref to output, its version, weakref to input, weakref to Remake]
_HOOK = "_lorakit_tap"


class Kept(NamedTuple):
    """What a kernel keeps for backward instead of its input x: x == remake(source)."""

    remake: Callable[[Tensor], Tensor]
    source: Tensor


class Remake:
    """norm(h) again, computed once for all the layers that read that output (q, k and v): each
    taker calls it once in its backward, and the last call lets the remade tensor go."""

    def __init__(self, norm: nn.Module) -> None:
        self.norm = norm
        self.takers = 0
        self._out: Tensor | None = None

    def __call__(self, h: Tensor) -> Tensor:
        out = self._out if self._out is not None else type(self.norm).forward(self.norm, h)
        self.takers -= 1
        self._out = out if self.takers > 0 else None
        return out


def _remember(norm: nn.Module, args: tuple, out: object) -> None:
    if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad and args):
        norm.__dict__.pop(_IO, None)
        return
    h = args[0]
    if isinstance(h, Tensor) and h.dtype == out.dtype == torch.float32:
        norm.__dict__[_IO] = [weakref.ref(out), out._version, weakref.ref(h), None]


def tap(norm: nn.Module) -> None:
    if _HOOK not in norm.__dict__:
        norm.__dict__[_HOOK] = norm.register_forward_hook(_remember)


def untap(norm: nn.Module) -> None:
    handle = norm.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()
    norm.__dict__.pop(_IO, None)


def source(norm: nn.Module | None, x: Tensor) -> Kept | None:
    """Kept(remake, input) such that remake(input) is x, when x is `norm`'s last output and
    gradients are on; else None."""
    io = norm.__dict__.get(_IO) if norm is not None and torch.is_grad_enabled() else None
    if io is None:
        return None
    out_ref, version, in_ref, remake_ref = io
    h = in_ref()
    if out_ref() is not x or x._version != version or h is None:
        return None
    # one Remake for all readers of this output, alive only as long as their backward needs it
    remake = remake_ref() if remake_ref is not None else None
    if remake is None:
        remake = Remake(norm)
        io[3] = weakref.ref(remake)
    remake.takers += 1
    return Kept(remake, h)
