"""transformers' Conv1D (GPT-2) as a base: a linear layer that stores W transposed, (in, out)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .dense import DenseLinear


@functools.cache
def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return None
    return Conv1D


class Conv1DBase(DenseLinear):
    """Conv1D computes x W + b with W (in, out); the seam presents W as (out, in)."""

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        self.module = module
        self.in_features, self.out_features = module.weight.shape
        self.fast = type(module) is conv1d_type()
        self.transposed = True
        self.mergeable = True
        self._compute = compute_dtype

    def linear(self, x: Tensor) -> Tensor:
        compute = self.compute_dtype()
        weight, bias = self.weight.to(compute), self.bias
        xc = x.to(compute).reshape(-1, x.shape[-1])
        out = xc @ weight if bias is None else torch.addmm(bias.to(compute), xc, weight)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        compute = self.compute_dtype()
        weight, grad = self.weight.to(compute).t(), grad.to(compute)
        return grad @ weight if into is None else into.addmm_(grad, weight)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        weight = self.weight.t()
        return weight if dtype is None else weight.to(dtype)

    def assign(self, weight: Tensor) -> None:
        self.weight.data = weight.t().contiguous().to(self.dtype)
