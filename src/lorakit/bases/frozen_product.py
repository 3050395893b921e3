"""The product of a packed frozen base (4-bit, GGUF blocks) under autograd: one node that saves nothing.

A packed base expands its weight for each product and frees it; kept for backward, the expanded
weight of every layer would be a dense copy of the model for the whole step. `frozen_linear`
runs x W^T (+ a frozen bias) as an autograd node that saves neither x nor W: backward asks the
base for g W (`FrozenBase.input_grad`), which expands the weight again. A base provides
`forward_product(x, bias)`, x W^T + bias with x in its compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, base, bias: Tensor | None) -> Tensor:
        ctx.base, ctx.shape = base, x.shape
        return base.forward_product(x, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        return ctx.base.input_grad(g).to(grad.dtype).reshape(ctx.shape), None, None


def frozen_linear(base, x: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + bias for a packed base (x in its compute dtype, `bias` frozen or None); when x needs a
    gradient, through the node that keeps nothing for backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenProduct.apply(x, base, bias)
    return base.forward_product(x, bias)
