"""The contract between a LoRA layer and the frozen layer under it.

LoRA needs from its base: the shape and dtype, the forward product x W^T (+ bias), the product
that carries a gradient back to the input, g W, and, for merging and export, the weight as a
dense (out, in) tensor and a way to write a merged one back (or a clear refusal). Everything is
laid out (out, in) here, whatever the module stores (Conv1D keeps (in, out)); the base hides it.

`linear` takes (..., in) in any dtype and returns x's dtype; `input_grad` takes and returns the
compute dtype (the kernels work in it). A base decides
how it computes them (`compute_dtype`): a 16-bit weight on a CPU without 16-bit matrix
instructions multiplies in fp32 (see `bases.compute`), a quantized one de-quantizes first.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class MergeRefused(ValueError):
    """This base cannot take merged weights back (a quantized base); the message says what to do."""


@runtime_checkable
class FrozenBase(Protocol):
    module: nn.Module  # the wrapped layer (the LoRA layer's `base_layer`)
    in_features: int
    out_features: int
    fast: bool  # the kernels may call `linear`/`input_grad` instead of the module
    transposed: bool  # the module stores W as (in, out) (PEFT's fan_in_fan_out: GPT-2's Conv1D)
    mergeable: bool  # `assign` takes merged weights; False: it raises MergeRefused (checked before any merge)

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def bias(self) -> Tensor | None: ...

    @property
    def frozen(self) -> bool:
        """True while the base weight takes no gradient (the fast path needs it)."""
        ...

    def compute_dtype(self) -> torch.dtype:
        """The dtype this base multiplies in on its device (the fast path works in it)."""
        ...

    def linear(self, x: Tensor) -> Tensor:
        """x W^T + bias for x (..., in) -> (..., out), in x's dtype."""
        ...

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        """grad W for grad (tokens, out) -> (tokens, in), computed in `compute_dtype()`; with
        `into` (tokens, in) added to it in place and returned (q/k/v sum their input gradients)."""
        ...

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight laid out (out, in), in `dtype` (default: the stored one); may be a view."""
        ...

    def assign(self, weight: Tensor) -> None:
        """Store a new (out, in) weight (merging); raises MergeRefused where the base cannot."""
        ...


@runtime_checkable
class QuantizedBase(Protocol):
    """A base stored quantized that can stand in a dense layer for a merge (`merge_and_unload`):
    merges go onto its de-quantized weight, the weight the adapter was trained against."""

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense nn.Linear holding W de-quantized (then cast to `dtype`) and the bias; self untouched."""
        ...

    def requantized(self, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A new layer of this kind, with this layer's quantization settings, holding `weight` (out, in)."""
        ...

    def requantize_refusal(self) -> str | None:
        """Why `requantized` cannot rebuild this layer (None: it can); asked before any merge."""
        ...
