"""bitsandbytes' Linear4bit (transformers' `load_in_4bit`, what PEFT users have) as a frozen base.

The module keeps its bytes: the packed weight (bitsandbytes' Params4bit) and its QuantState
(absmax, 8-bit with the nested state under double quantization, block size, quant type, dtype).
Its products de-quantize them with lorakit's own `bases.quant4`, whose format is bitsandbytes'
byte for byte, so they follow lorakit's rules as `linear4bit.Linear4bitBase` does: W is
de-quantized to the QuantState's dtype, then cast to the compute dtype (the module's
`compute_dtype`, else the weight's dtype), which `bases.compute.product_dtype` may widen to fp32
on a CPU that only emulates 16-bit products. bitsandbytes' kernels are never called.

bitsandbytes is never imported here: its Linear4bit subclasses nn.Linear, so the registry asks
`linear4bit_type()` first, which finds the class only when the user's program imported
bitsandbytes (it is in `sys.modules`); otherwise no bitsandbytes module can exist.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant4
from .compute import product_dtype
from .frozen_product import frozen_linear
from .protocol import MergeRefused
from .dense import frozen_dense_linear

MERGE_REFUSED = ("cannot merge into a 4-bit base (bitsandbytes Linear4bit) in place: its weight is stored quantized; "
                 "keep the adapter unmerged, or merge_and_unload() for a model merged onto the de-quantized weights")


def _bnb_class(name: str) -> type | None:
    """bitsandbytes.nn.`name` when bitsandbytes is already imported, else None (never imports)."""
    modules = sys.modules.get("bitsandbytes.nn.modules")
    kind = getattr(modules, name, None)
    return kind if isinstance(kind, type) else None


def linear4bit_type() -> type | None:
    """bitsandbytes.nn.Linear4bit, or None when bitsandbytes was not imported."""
    return _bnb_class("Linear4bit")


def linear8bit_type() -> type | None:
    """bitsandbytes.nn.Linear8bitLt (transformers' `load_in_8bit`), or None: refused, not adapted."""
    return _bnb_class("Linear8bitLt")


def refuse_8bit(module: nn.Module):
    """Linear8bitLt subclasses nn.Linear, but its weight is int8 codes with row scales: adapting it as a
    dense layer would compute with the codes. A one-line refusal naming the way out instead."""
    raise TypeError(f"bitsandbytes' 8-bit Linear8bitLt ({module.out_features}x{module.in_features}) is not a base "
                    "lorakit adapts; load the model in 4 bits (lorakit.load_model(..., quantization='nf4') or "
                    "BitsAndBytesConfig(load_in_4bit=True)) or in 16/32 bits")


def params4bit_type() -> type | None:
    """bitsandbytes.nn.Params4bit (the packed weight's parameter class), or None."""
    return _bnb_class("Params4bit")


def quant_state(module: nn.Module):
    """The layer's QuantState; ValueError in one line when it has none (not quantized yet) or holds
    its bytes in a layout other than bitsandbytes' (IPEX's CPU/XPU repacking)."""
    state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"bitsandbytes {type(module).__name__} ({module.out_features}x{module.in_features}) has no "
                         "quant_state: it is not quantized yet (move it to its device first)")
    if getattr(state, "ipex", False):
        raise ValueError(f"bitsandbytes {type(module).__name__} ({module.out_features}x{module.in_features}) holds "
                         "its weight repacked for IPEX; lorakit reads bitsandbytes' own 4-bit layout only")
    return state


def block_absmax(state) -> Tensor:
    """The fp32 absmax of every block, de-quantized through the nested state under double quant."""
    if not state.nested:
        return state.absmax.float()
    nested = state.state2
    return quant4.dequantize_absmax(state.absmax, nested.absmax, state.offset, blocksize=nested.blocksize,
                                    values=nested.code)


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """W (out, in) of a bitsandbytes Linear4bit in its QuantState's dtype, then cast to `dtype`."""
    state = quant_state(module)
    packed = module.weight.data
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage (e.g. bf16 for FSDP) holds the same bytes
        packed = packed.reshape(-1).view(torch.uint8)
    w = quant4.dequantize_4bit(packed, block_absmax(state), tuple(state.shape), state.quant_type, state.blocksize,
                               state.dtype)
    return w if dtype is None or dtype == w.dtype else w.to(dtype)


class BnbLinear4bitBase:
    """bitsandbytes' Linear4bit as a FrozenBase: products de-quantize W with quant4; merging in place
    refuses; `dequantized` / `requantized` let merge_and_unload merge onto the de-quantized weight."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.in_features, self.out_features = module.in_features, module.out_features
        self.fast = type(module) is linear4bit_type()  # a subclass may compute something else: call it
        self.transposed = False
        self.mergeable = False

    @property
    def bias(self) -> Tensor | None:
        return self.module._parameters.get("bias")

    @property
    def dtype(self) -> torch.dtype:
        return quant_state(self.module).dtype

    @property
    def device(self) -> torch.device:
        return self.module._parameters["weight"].device

    @property
    def frozen(self) -> bool:
        return True  # packed 4-bit codes take no gradient

    def compute_dtype(self) -> torch.dtype:
        return product_dtype(self.module.compute_dtype or self.dtype, self.device)

    def linear(self, x: Tensor) -> Tensor:
        compute = self.compute_dtype()
        bias = self.bias
        inner = None if bias is None or bias.requires_grad else bias.to(compute)  # a frozen bias joins the product
        out = frozen_linear(self, x.to(compute), inner)
        if bias is not None and inner is None:  # a bias made trainable: autograd adds it
            out = out + bias.to(compute)
        return out.to(x.dtype)

    def forward_product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, dequantize(self.module, x.dtype), bias)

    def input_grad(self, grad: Tensor, into: Tensor | None = None) -> Tensor:
        compute = self.compute_dtype()
        weight, grad = dequantize(self.module, compute), grad.to(compute)
        return grad @ weight if into is None else into.addmm_(grad, weight)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self.module, dtype)

    def assign(self, weight: Tensor) -> None:
        raise MergeRefused(MERGE_REFUSED)

    # merge_and_unload stands a dense layer in for a quantized one (merges go onto the de-quantized weight)
    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear holding W de-quantized (then cast to `dtype`) and the bias; the layer is untouched."""
        return frozen_dense_linear(self.dense(dtype), self.bias, self.module.training)

    def requantize_refusal(self) -> str | None:
        return None

    def requantized(self, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A new bitsandbytes Linear4bit with this layer's settings holding `weight` (out, in), quantized
        by bitsandbytes itself on the layer's device (its classes come from the user's own import)."""
        module, state = self.module, quant_state(self.module)
        storage = getattr(module.weight, "quant_storage", torch.uint8)
        new = type(module)(self.in_features, self.out_features, bias=bias is not None, compute_dtype=module.compute_dtype,
                           compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=storage,
                           device="meta")
        new.weight = params4bit_type()(weight.detach().to(self.device, state.dtype, copy=True), requires_grad=False,
                                       quant_type=state.quant_type, blocksize=state.blocksize,
                                       compress_statistics=state.nested, quant_storage=storage)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().to(self.device, copy=True), requires_grad=False)
        return new.to(self.device).train(module.training)
