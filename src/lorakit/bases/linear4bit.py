"""A frozen linear layer stored in 4 bits (QLoRA's NF4/FP4, bitsandbytes' layout), and its base.

`Linear4bit` is lorakit's own module (torch only): the packed weight and its absmax (8-bit with
double quantization) are buffers, the bias a frozen parameter. Every product de-quantizes the
whole layer's weight for that product only (never a copy of the model), as QLoRA does, so
memory holds 4 bits per weight plus one layer in the compute dtype at a time: `product` is
that de-quantize-then-multiply, the one function a fused kernel (a GPU GEMM reading the packed
bytes) replaces. Under autograd the layer's own product saves nothing for backward (not x, not
the de-quantized weight): backward de-quantizes again for g W, so the general (unfused) LoRA
path holds no dense weights between forward and backward either. Keeping a layer's dense
weight from forward to backward would save one de-quantization (1-3 % of a SmolLM2 layer's
forward + backward on CPU) at the cost of a whole-model dense copy during the step: not done.

Dtypes: `weight_dtype` is the dtype the weight was quantized from and de-quantizes to
(bitsandbytes' QuantState.dtype); products run in `compute_dtype` when one is configured, else in
`weight_dtype`, each through `bases.compute.product_dtype` (fp32 for a 16-bit dtype on a CPU that
only emulates 16-bit products). As bitsandbytes' matmul_4bit, the weight is de-quantized to
`weight_dtype` first and then cast to the compute dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant4
from .compute import product_dtype
from .dense import frozen_dense_linear
from .frozen_product import frozen_linear
from .protocol import MergeRefused

MERGE_REFUSED = ("cannot merge into a 4-bit base (Linear4bit) in place: its weight is stored quantized; keep the adapter "
                 "unmerged, or merge_and_unload() for a model merged onto the de-quantized weights")


@dataclass(frozen=True)
class WeightSource:
    """Where a 4-bit layer's 16/32-bit weight was read from: a safetensors file and the tensor's key
    (what LoftQ reads back, `lora.loftq`)."""

    file: str | os.PathLike
    key: str

    def read(self) -> Tensor:
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.key)


class Linear4bit(nn.Module):
    """y = x W^T + b with W held as packed 4-bit codes; frozen (the codes take no gradient).

    `source` is the WeightSource its weight was quantized from when the streaming loader read it
    from a checkpoint, else None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, weight_dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        quant4.check_quant_type(quant_type)
        quant4.check_blocksize(blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.weight_dtype, self.compute_dtype = weight_dtype, compute_dtype
        self.source: WeightSource | None = None
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        if double_quant:
            nested = -(-blocks // quant4.ABSMAX_BLOCKSIZE)
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(nested, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
            # the 8-bit map the absmax codes index (a file may carry its own: bitsandbytes' CPU
            # kernel writes -1 for the dynamic map's lowest value)
            self.register_buffer("nested_quant_map", quant4.dynamic_map().to(device, copy=True))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False) if bias else None

    @torch.no_grad()
    def quantize_(self, weight: Tensor) -> Linear4bit:
        """Store an (out, in) float weight, quantized; returns self."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        packed, absmax = quant4.quantize_4bit(weight.to(self.weight.device), self.quant_type, self.blocksize)
        self.weight.copy_(packed)
        if self.double_quant:
            codes, nested, offset = quant4.quantize_absmax(absmax)
            self.absmax.copy_(codes)
            self.nested_absmax.copy_(nested)
            self.offset.copy_(offset)
            self.nested_quant_map.copy_(quant4.dynamic_map())
        else:
            self.absmax.copy_(absmax)
        return self

    def block_absmax(self) -> Tensor:
        """The fp32 absmax of every block (de-quantized first under double quantization)."""
        if not self.double_quant:
            return self.absmax
        return quant4.dequantize_absmax(self.absmax, self.nested_absmax, self.offset, values=self.nested_quant_map)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W (out, in) in `weight_dtype`, then cast to `dtype` when given (de-quantized straight
        into it: a bf16 weight wanted in fp32 is rounded in its fp32 buffer)."""
        shape = (self.out_features, self.in_features)
        return quant4.dequantize_4bit(self.weight, self.block_absmax(), shape, self.quant_type, self.blocksize,
                                      self.weight_dtype, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return Linear4bitBase(self).linear(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
    """A Linear4bit holding `linear`'s weight quantized (and its bias as is), on its device."""
    weight = linear.weight
    layer = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, quant_type=quant_type,
                       blocksize=blocksize, double_quant=double_quant, weight_dtype=weight.dtype,
                       compute_dtype=compute_dtype, device=weight.device)
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach())
    return layer.quantize_(weight)


def dequantize_linear(layer: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """The dense nn.Linear `layer` stands for: W de-quantized (to its weight dtype, then `dtype`)
    and the bias, on its device; `layer` is untouched."""
    return frozen_dense_linear(layer.dequantize(dtype), layer.bias, layer.training)


def requantize_like(layer: Linear4bit, weight: Tensor, bias: Tensor | None) -> Linear4bit:
    """A new Linear4bit with `layer`'s settings (quant type, blocksize, double quant, weight and
    compute dtypes) holding `weight` (out, in) quantized and `bias`."""
    new = Linear4bit(layer.in_features, layer.out_features, bias is not None, quant_type=layer.quant_type,
                     blocksize=layer.blocksize, double_quant=layer.double_quant, weight_dtype=layer.weight_dtype,
                     compute_dtype=layer.compute_dtype, device=layer.weight.device)
    if bias is not None:
        new.bias.data.copy_(bias.detach())
    return new.quantize_(weight).train(layer.training)


class Linear4bitBase:
    """Linear4bit as a FrozenBase: products de-quantize W in the compute dtype; merging in place
    refuses, `merge_and_unload` merges onto `dequantized()` (a QuantizedBase)."""

    def __init__(self, module: Linear4bit) -> None:
        self.module = module
        self.in_features, self.out_features = module.in_features, module.out_features
        self.fast = type(module) is Linear4bit
        self.transposed = False
        self.mergeable = False

    @property
    def bias(self) -> Tensor | None:
        return self.module._parameters.get("bias")

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight_dtype

    @property
    def device(self) -> torch.device:
        return self.module._buffers["weight"].device

    @property
    def frozen(self) -> bool:
        return True

    def compute_dtype(self) -> torch.dtype:
        return product_dtype(self.module.compute_dtype or self.module.weight_dtype, self.device)

    def linear(self, x: Tensor) -> Tensor:
        compute = self.compute_dtype()
        xw, bias = x.to(compute), self.bias
        inner = None if bias is None or bias.requires_grad else bias.to(compute)  # a frozen bias joins the product
        out = frozen_linear(self, xw, inner)
        if bias is not None and inner is None:  # a bias made trainable: autograd adds it
            out = out + bias.to(compute)
        return out.to(x.dtype)

    def forward_product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return product(self.module, x, x.dtype, bias=bias)

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        compute = self.compute_dtype()
        return product(self.module, grad.to(compute), compute, to_input=True, into=into)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.module.dequantize(dtype)

    def assign(self, weight: Tensor) -> None:
        raise MergeRefused(MERGE_REFUSED)

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        return dequantize_linear(self.module, dtype)

    def requantize_refusal(self) -> str | None:
        return None

    def requantized(self, weight: Tensor, bias: Tensor | None) -> Linear4bit:
        return requantize_like(self.module, weight, bias)


def product(layer: Linear4bit, a: Tensor, compute: torch.dtype, *, to_input: bool = False,
            bias: Tensor | None = None, into: Tensor | None = None) -> Tensor:
    """a W^T (+ bias) for a (..., in), or with `to_input` a W for a (tokens, out), the product
    that carries a gradient to the input (added into `into` when given); a in `compute`.

    The one place a 4-bit weight meets a matrix product. W (out, in) is de-quantized in
    `compute` for this product alone and freed when it returns, so memory holds one layer's dense
    weight at a time. A fused de-quantize-and-multiply kernel (a GPU GEMM reading the packed
    bytes and absmax) replaces the body of this function; nothing else changes.
    """
    w = layer.dequantize(compute)  # (out, in)
    if not to_input:
        return F.linear(a, w, bias)
    return a @ w if into is None else into.addmm_(a, w)
