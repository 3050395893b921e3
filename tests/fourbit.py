"""4-bit test models and their dense references: the same model with every Linear4bit replaced
by an nn.Linear holding the de-quantized weight (the weights a 4-bit base computes with)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def quantized(model: nn.Module, **config) -> nn.Module:
    """`model` with its linear layers but the head in 4 bits (lorakit.quantize_model)."""
    from lorakit import QuantConfig, quantize_model

    return quantize_model(model, QuantConfig(**config))


def dequantized_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy with each Linear4bit as a plain nn.Linear of its de-quantized weight (built
    here by hand, not by lorakit's merge helpers, so that it can serve as their reference)."""
    from lorakit.bases.linear4bit import Linear4bit

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, Linear4bit):
            weight = module.dequantize(dtype)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            dense.set_submodule(name, linear.requires_grad_(False))
    return dense.eval()


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lorakit.bases.linear4bit import Linear4bit

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy every adapter tensor (lora_A/B, magnitude) of `src` into `dst` by parameter name."""
    wanted = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name:
                wanted[name].copy_(p)
