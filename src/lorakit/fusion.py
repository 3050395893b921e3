"""Block-level fast path: a LoRA-adapted SwiGLU MLP (Llama, Mistral, Qwen2, …) as one autograd node.

The MLP's own forward, down(act(gate(x)) * up(x)), keeps four (tokens, intermediate) tensors
alive for backward; `kernels.lora_swiglu` keeps two. In inference it skips three module calls
per layer, which decoding (one token at a time) feels. `attach` gives every such MLP in a model
a forward that takes the fused kernel whenever its three projections are on the single-adapter
fast path, and the module's own forward otherwise (mixed batches, merged or disabled adapters,
dropout in training, DoRA, biases). `detach` undoes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels import lora_swiglu
from .layers import Linear

PARTS = ("gate_proj", "up_proj", "down_proj")
# model type -> its transformers MLP class, whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
SWIGLU_MLPS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


class FusedSwiGLU:
    """Stands in for an MLP's `forward` (an instance attribute, so deepcopy and pickling keep working)."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        parts = self._fast_parts(x) if not args and not kwargs else None
        if parts is None:
            return type(self.mlp).forward(self.mlp, x, *args, **kwargs)
        return lora_swiglu(x, *parts)

    def _fast_parts(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor, float]] | None:
        parts = []
        for attr in PARTS:
            layer = getattr(self.mlp, attr)
            name = layer.fast_adapter() if isinstance(layer, Linear) else None
            if name is None or layer.fan_in_fan_out or layer.base_layer.bias is not None:
                return None
            W, A, B = layer.base_layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight
            if W.requires_grad or W.dtype != x.dtype or A.dtype != B.dtype:
                return None
            parts.append((W, A, B, layer.scaling[name]))
        return parts


def attach(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ not in SWIGLU_MLPS.values() or isinstance(module.__dict__.get("forward"), FusedSwiGLU):
            continue
        if all(isinstance(getattr(module, p, None), Linear) for p in PARTS) and _is_silu(module.act_fn):
            module.forward = FusedSwiGLU(module)


def detach(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FusedSwiGLU):
            del module.forward
