"""A dense torch.nn.Linear base (fp32, bf16, fp16, fp64): W stored (out, in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compute import product_dtype


class DenseLinear:
    """nn.Linear as a FrozenBase. The tensors are read from the module at every call, so weights
    loaded, moved or replaced later are the ones used."""

    def __init__(self, module: nn.Linear, compute_dtype: torch.dtype | None = None) -> None:
        self.module = module
        self.out_features, self.in_features = module.weight.shape
        self.fast = type(module) is nn.Linear  # a subclass may compute something else: call it
        self.transposed = False
        self.mergeable = True
        self._compute = compute_dtype  # None: bases.compute decides per device

    # Module.__getattr__ is a Python call; decoding reads these ~200 times a token
    @property
    def weight(self) -> Tensor:
        return self.module._parameters["weight"]

    @property
    def bias(self) -> Tensor | None:
        return self.module._parameters.get("bias")

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def compute_dtype(self) -> torch.dtype:
        weight = self.weight
        return self._compute or product_dtype(weight.dtype, weight.device)

    def computing_in(self, dtype: torch.dtype) -> "DenseLinear":
        """The same layer, its products in `dtype` (the fused kernels under torch.autocast)."""
        return type(self)(self.module, compute_dtype=dtype)

    def linear(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        compute = self._compute or product_dtype(weight.dtype, weight.device)
        if compute == weight.dtype == x.dtype:
            return F.linear(x, weight, bias)
        bias = None if bias is None else bias.to(compute)
        return F.linear(x.to(compute), weight.to(compute), bias).to(x.dtype)

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        weight = self.weight
        compute = self._compute or product_dtype(weight.dtype, weight.device)
        if compute != weight.dtype or compute != grad.dtype:
            weight, grad = weight.to(compute), grad.to(compute)
        return grad @ weight if into is None else into.addmm_(grad, weight)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        weight = self.weight
        return weight if dtype is None else weight.to(dtype)

    def assign(self, weight: Tensor) -> None:
        self.weight.data = weight.to(self.dtype)


def frozen_dense_linear(weight: Tensor, bias: Tensor | None, training: bool) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) and a copy of `bias` in the weight's dtype:
    the dense layer a quantized base stands for."""
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(weight.dtype, copy=True), requires_grad=False)
    return dense.train(training)
