"""LoftQ: start an adapter where quantization left the weight (PEFT's `init_lora_weights="loftq"`).

Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"
(arXiv:2310.08659): for a weight W stored in 4 bits, alternate T times

    Q = quantize(W - s B A),    s B A = the best rank-r approximation of W - dequantize(Q)

so that the 4-bit base plus the adapter starts near W instead of at dequantize(quantize(W)), and
fine-tuning spends no steps undoing the rounding. With one iteration Q is the plain quantization of
W (the base is exactly what loading in 4 bits gives, the adapter alone changes); with more, the
stored codes change too and the adapter belongs to that base (the trainer saves it beside the
adapter).

Where lorakit differs from PEFT: the factors are divided by the scaling s = lora_alpha / r, so
base + adapter starts at the approximation whatever lora_alpha is (PEFT's starts at s times it);
it needs neither bitsandbytes nor a GPU; a lorakit 4-bit base keeps its own quant type, blocksize
and double quantization, its 16/32-bit weights read back from the checkpoint one layer at a time.
A dense nn.Linear gets PEFT's behaviour: its weight becomes dequantize(Q) (NF4, blocks of 64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..bases import quant4
from ..bases.linear4bit import Linear4bit, requantize_like

DENSE_QUANT = ("nf4", 64)  # what PEFT's LoftQ quantizes a dense weight with (bitsandbytes' defaults)


# -- the math ------------------------------------------------------------------------------
def loftq_factors(weight: Tensor, roundtrip: Callable[[Tensor], Tensor], rank: int, iters: int,
                  scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """(the tensor whose quantization the base stores, A (rank, in), B (out, rank)), fp32.

    `roundtrip(t)` is dequantize(quantize(t)) in the base's format. s B A (s = `scaling`) is the
    rank-`rank` truncated SVD of W - roundtrip(stored) after `iters` alternations; ranks beyond
    min(out, in) are zero rows and columns.
    """
    w = weight.detach().float()
    stored = w
    for i in range(iters):
        u, s, vh = torch.linalg.svd(w - roundtrip(stored), full_matrices=False)
        k = min(rank, s.numel())
        if i + 1 < iters:
            stored = w - (u[:, :k] * s[:k]) @ vh[:k]
    root = (s[:k] / scaling).sqrt()
    a = w.new_zeros(rank, w.shape[1])
    b = w.new_zeros(w.shape[0], rank)
    a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
    return stored, a, b


# -- the bases it starts from --------------------------------------------------------------
class _Dense:
    """A dense nn.Linear: W is its weight; it ends holding dequantize(Q) in its dtype (PEFT's way)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer

    def original(self) -> Tensor:
        return self.layer.weight.detach()

    @staticmethod
    def roundtrip(t: Tensor) -> Tensor:
        quant_type, blocksize = DENSE_QUANT
        packed, absmax = quant4.quantize_4bit(t, quant_type, blocksize)
        return quant4.dequantize_4bit(packed, absmax, t.shape, quant_type, blocksize)

    def install(self, stored: Tensor) -> None:
        self.layer.weight.data.copy_(self.roundtrip(stored))


class _FourBit:
    """lorakit's Linear4bit read from a checkpoint: W is read back from it; it ends holding Q's codes."""

    def __init__(self, layer: Linear4bit) -> None:
        self.layer = layer

    def original(self) -> Tensor:
        # on the layer's device, cast as the loader cast it before quantizing
        return self.layer.source.read().to(self.layer.weight.device, self.layer.weight_dtype)

    def roundtrip(self, t: Tensor) -> Tensor:
        return requantize_like(self.layer, t, None).dequantize(torch.float32)

    def install(self, stored: Tensor) -> None:
        self.layer.quantize_(stored)


def _start(name: str, module: nn.Module) -> _Dense | _FourBit:
    """The base LoftQ works on for the module named `name`, or ValueError naming why it cannot."""
    if isinstance(module, Linear4bit):
        if module.source is None:
            raise ValueError(
                f"init_lora_weights='loftq': {name} holds no 16/32-bit weight to start from (quantized in memory "
                "or read from a 4-bit directory); load the model with lorakit.load_model(path, quantization=...) "
                "from its 16/32-bit checkpoint")
        return _FourBit(module)
    if type(module) is nn.Linear:
        return _Dense(module)
    raise ValueError(f"init_lora_weights='loftq': {name} is a {type(module).__name__}; LoftQ starts from an "
                     "nn.Linear or a lorakit 4-bit layer loaded from a 16/32-bit checkpoint")


def plan(model: nn.Module, targets: list[str]) -> dict[str, _Dense | _FourBit]:
    """Every target's LoftQ base, checked before the model is touched (ValueError for the first that
    cannot start: a layer that already carries an adapter, an embedding, a GGUF or bitsandbytes base)."""
    from .layers import LoraLayer

    starts = {}
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoraLayer):
            raise ValueError(f"init_lora_weights='loftq': {name} already carries an adapter; LoftQ rewrites the "
                             "base, so it initialises a model's first adapter only")
        starts[name] = _start(name, module)
    return starts


@torch.no_grad()
def initialise(model: nn.Module, starts: dict[str, _Dense | _FourBit], adapter: str, iters: int) -> None:
    """Rewrite each planned base and start its adapter `adapter` (already added) at LoftQ's factors."""
    for name, start in starts.items():
        layer = model.get_submodule(name)
        stored, a, b = loftq_factors(start.original(), start.roundtrip, layer.r[adapter], iters,
                                     layer.scaling[adapter])
        start.install(stored)
        layer.lora_A[adapter].weight.copy_(a)
        layer.lora_B[adapter].weight.copy_(b)
        layer._adapters_changed()
