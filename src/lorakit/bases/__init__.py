"""The frozen-base seam: what a LoRA layer needs from the layer it wraps, one module per kind.

`protocol.FrozenBase` is the contract (shape, dtype, the forward product, the product to the
input, a dense copy, writing a merged weight back); `registry` maps a module type to its base
and gives the one "cannot adapt" error. A new kind of base (4-bit: `linear4bit`; bitsandbytes'
Linear4bit: `bnb4bit`; GGUF blocks: `gguf_linear`) is one new module registered there; the LoRA
layers and the fast-path kernels only see the protocol.
"""

from .gguf_linear import GGUFLinear
from .protocol import FrozenBase, MergeRefused, QuantizedBase
from .registry import adaptable_types, check_adaptable, frozen_base, is_adaptable, is_embedding, is_linear, register

__all__ = [
    "FrozenBase",
    "GGUFLinear",
    "MergeRefused",
    "QuantizedBase",
    "adaptable_types",
    "check_adaptable",
    "frozen_base",
    "is_adaptable",
    "is_embedding",
    "is_linear",
    "register",
]
