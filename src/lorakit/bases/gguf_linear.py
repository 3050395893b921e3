"""A frozen linear layer that keeps its weight in GGUF blocks, and its FrozenBase.

`GGUFLinear` holds the file's bytes (a uint8 buffer, (out, bytes per row)) instead of a dense
weight: a Q4_1 layer takes 0.625 bytes a value instead of fp32's 4. Each product de-quantizes the
weight a block of rows at a time (`chunk_values` values, 16 MiB of fp32 by default: a small
model's layers in one piece), multiplies, and frees it before the next block, so no dense copy of
the model ever exists. Backward recomputes the rows the same way and keeps nothing.

Products run in fp32 by default: the de-quantized values are exact in fp32 (`gguf_blocks`), so
the result is that of llama.cpp's weights with fp32 accumulation. `compute_dtype=torch.bfloat16`
rounds each weight once and multiplies in bf16 where the device does so natively; on a CPU that
only emulates 16-bit products the rounded values multiply in fp32 (`bases.compute.product_dtype`,
as every other base: emulated bf16 products are 6-60x slower there).

The rows are the file's rows: Llama-family GGUF files store attn_q/attn_k rows permuted for
llama.cpp's rotary layout. This module does not undo that; whoever builds a model from a file
must (the GGUF model loader), as it must map tensor names.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from . import gguf_blocks
from .compute import product_dtype
from .frozen_product import frozen_linear
from .dense import frozen_dense_linear
from .protocol import MergeRefused


class GGUFLinear(nn.Module):
    """x W^T + bias with W (out_features, in_features) kept as GGUF blocks of type `qtype`."""

    def __init__(self, blocks: Tensor, qtype: int, out_features: int, in_features: int,
                 bias: Tensor | None = None, *, name: str | None = None,
                 compute_dtype: torch.dtype = torch.float32, chunk_values: int = 1 << 22) -> None:
        super().__init__()
        per_row = gguf_blocks.row_bytes(qtype, in_features, name)  # refuses unknown types here
        if blocks.dtype != torch.uint8 or blocks.numel() != out_features * per_row:
            raise ValueError(f"{name or 'GGUFLinear'}: expected {out_features * per_row} uint8 bytes of "
                             f"{gguf_blocks.layout(qtype).name} blocks, got {blocks.numel()} {blocks.dtype}")
        self.register_buffer("blocks", blocks.reshape(out_features, per_row))
        self.qtype, self.out_features, self.in_features = int(qtype), out_features, in_features
        self.name, self.compute_dtype = name, compute_dtype
        self.rows_per_chunk = max(1, chunk_values // in_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def kind(self) -> str:
        return gguf_blocks.layout(self.qtype).name

    def chunks(self) -> Iterator[tuple[int, int]]:
        """The [start, stop) row ranges each product expands in turn."""
        for start in range(0, self.out_features, self.rows_per_chunk):
            yield start, min(start + self.rows_per_chunk, self.out_features)

    def work_dtype(self) -> torch.dtype:
        """The dtype the products run in on this device: the compute dtype, or fp32 where the
        device only emulates it (`bases.compute.product_dtype`)."""
        return product_dtype(self.compute_dtype, self.blocks.device)

    def rows(self, start: int, stop: int) -> Tensor:
        """W[start:stop] (stop - start, in) rounded to the compute dtype, in the work dtype, freshly
        de-quantized."""
        shape = (self.out_features, self.in_features)
        rows = gguf_blocks.dequantize_rows(self.blocks, self.qtype, shape, start, stop, self.name)
        return rows.to(self.compute_dtype).to(self.work_dtype())

    def dense(self) -> Tensor:
        """The whole W (out, in) in the work dtype: a new tensor each call."""
        return self.rows(0, self.out_features)

    def product(self, x: Tensor) -> Tensor:
        """x W^T for x (tokens, in) in the work dtype -> (tokens, out), no bias, no autograd."""
        if self.rows_per_chunk >= self.out_features:
            return x @ self.dense().t()
        out = x.new_empty(x.shape[0], self.out_features)
        for start, stop in self.chunks():
            out[:, start:stop] = x @ self.rows(start, stop).t()
        return out

    def forward_product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """`product` with a bias added (frozen_product's hook)."""
        out = self.product(x)
        return out if bias is None else out.add_(bias)

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        """grad W for grad (tokens, out) -> (tokens, in) in the work dtype; added to `into`."""
        grad = grad.to(self.work_dtype())
        for start, stop in self.chunks():
            g, w = grad[:, start:stop], self.rows(start, stop)  # (tokens, rows), (rows, in)
            into = g @ w if into is None else into.addmm_(g, w)
        return into

    def linear(self, x: Tensor) -> Tensor:
        """x W^T + bias for x (..., in) -> (..., out) in x's dtype; differentiable in x (and bias)."""
        x2 = x.reshape(-1, self.in_features).to(self.work_dtype())  # (tokens, in)
        out = frozen_linear(self, x2, None)  # under autograd: saves nothing, W expanded again in backward
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    forward = linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.kind}, "
                f"bias={self.bias is not None}")


class GGUFBase:
    """GGUFLinear as a FrozenBase. `dtype` is the compute dtype (what `dense()` gives and the
    adapters sit beside), not the bytes' uint8; the weight is always frozen."""

    fast = True
    transposed = False
    mergeable = False  # assign refuses: merging would re-quantize the blocks
    frozen = True

    def __init__(self, module: GGUFLinear) -> None:
        self.module = module
        self.out_features, self.in_features = module.out_features, module.in_features

    @property
    def bias(self) -> Tensor | None:
        return self.module._parameters.get("bias")

    @property
    def dtype(self) -> torch.dtype:
        return self.module.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.module.blocks.device

    def compute_dtype(self) -> torch.dtype:
        return self.module.work_dtype()

    def linear(self, x: Tensor) -> Tensor:
        return self.module.linear(x)

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        return self.module.input_grad(grad, into)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.module.dense().to(dtype or self.dtype)

    def assign(self, weight: Tensor) -> None:
        raise MergeRefused(
            f"cannot merge into {self.module.name or 'a GGUFLinear'} in place: the base holds {self.module.kind} GGUF "
            "blocks, which merging would re-quantize; merge_and_unload() returns a model merged onto the "
            "de-quantized blocks"
        )

    # merge_and_unload stands a dense layer in for the blocks (merges go onto the weights the adapter trained against)
    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear holding W de-quantized (then cast to `dtype`) and the bias; the blocks are untouched."""
        return frozen_dense_linear(self.dense(dtype), self.bias, self.module.training)

    def requantize_refusal(self) -> str | None:
        if gguf_blocks.quantizable(self.module.qtype):
            return None
        return (f"{self.module.name or 'a GGUFLinear'} holds {self.module.kind} GGUF blocks, which gguf-py cannot "
                "quantize; merge without requantize (a dense model) or write a GGUF with `lorakit merge --output "
                "model.gguf` and llama.cpp's llama-quantize")

    def requantized(self, weight: Tensor, bias: Tensor | None) -> GGUFLinear:
        """A new GGUFLinear of this layer's type and settings holding `weight` (out, in) rounded into blocks."""
        module = self.module
        blocks = gguf_blocks.quantize(weight, module.qtype, module.name).to(self.device)
        return GGUFLinear(blocks, module.qtype, module.out_features, module.in_features, bias, name=module.name,
                          compute_dtype=module.compute_dtype,
                          chunk_values=module.rows_per_chunk * module.in_features).train(module.training)
