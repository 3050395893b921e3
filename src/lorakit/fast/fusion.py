"""Block-level fast paths for Llama-style decoders (Llama, Mistral, Qwen2, Qwen3).

- The MLP as one autograd node: its own forward, down(act(gate(x)) * up(x)), keeps four
  (tokens, intermediate) tensors alive for backward; `kernels.lora_swiglu` keeps two. In
  inference it skips three module calls per layer, which decoding feels. Every such MLP gets a
  forward that takes the fused kernel whenever its three projections are on the single-adapter
  fast path, and the module's own forward otherwise (mixed batches, merged or disabled
  adapters, dropout in training, DoRA, biases).
- q, k and v (those of them with adapters, two or three) as one autograd node in training
  (`kernels.lora_shared_input`): they read the same input, so backward makes one A-gradient
  matmul for all and adds their input gradients up in place. The attention calls q_proj,
  k_proj, v_proj in that order on one tensor; the first call computes the group's outputs and
  the next ones take theirs.
- Norm outputs remade in backward (`lorakit.fast.recompute`): q/k/v learn which norm they read, and
  the fused MLP too.
`attach` sets these up when adapters are added; `detach` undoes them.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import recompute
from .kernels import LoraWeightsBias, lora_shared_input, lora_swiglu
from ..lora.layers import Linear

PARTS = ("gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")
# model type -> its transformers MLP class, whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
SWIGLU_MLPS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}
# ... and their decoder blocks: input_layernorm -> self_attn (q/k/v), post_attention_layernorm -> mlp
DECODER_LAYERS = {name.removesuffix("MLP") + "DecoderLayer" for name in SWIGLU_MLPS.values()}
_MLP_NORM = "_lorakit_input_norm"


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


class FusedSwiGLU:
    """Stands in for an MLP's `forward` (an instance attribute, so deepcopy and pickling keep working)."""

    def __init__(self, mlp: nn.Module, norm: nn.Module | None = None) -> None:
        self.mlp = mlp
        self.norm = norm  # the norm whose output the MLP reads (lorakit.fast.recompute)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        parts = self._fast_parts(x) if not args and not kwargs else None
        if parts is None:
            return type(self.mlp).forward(self.mlp, x, *args, **kwargs)
        return lora_swiglu(x, *parts, *recompute.source(self.norm, x))

    def _fast_parts(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor, float]] | None:
        parts = [_fast_weights(getattr(self.mlp, attr), x) for attr in PARTS]
        if any(p is None or p[1] is not None for p in parts):  # no biases in the fused kernel
            return None
        return [(W, A, B, s) for W, _, A, B, s in parts]


def _fast_weights(layer: nn.Module, x: Tensor) -> LoraWeightsBias | None:
    """(W, bias, A, B, scaling) of the one adapter `layer` runs for input x on the fast path, with
    frozen base weights in x's dtype; None when the layer needs its general path."""
    parts = layer.fast_weights() if isinstance(layer, Linear) and not layer.fan_in_fan_out else None
    if parts is None:
        return None
    W, bias, A, B, _ = parts
    if W.requires_grad or W.dtype != x.dtype or A.dtype != B.dtype:
        return None
    if bias is not None and (bias.requires_grad or bias.dtype != x.dtype):
        return None
    return parts


class SharedInput:
    """The adapted ones among q, k and v of one attention block (see the module docstring), in
    the order the attention calls them; each one's `forward` is a `SharedInput.Member`."""

    class Member:
        def __init__(self, group: SharedInput, index: int) -> None:
            self.group, self.index = group, index

        def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
            group = self.group
            if group._waiting is None and (self.index or not torch.is_grad_enabled()):  # inference: no detour
                layer = group.layers[self.index]
                return type(layer).forward(layer, x, *args, **kwargs)
            return group.call(self.index, x, *args, **kwargs)

    def __init__(self, layers: tuple[Linear, ...], norm: nn.Module | None) -> None:
        self.layers = layers
        self.norm = norm
        self._waiting: tuple | None = None  # (weakref to the input, its version, outputs not yet taken)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_waiting": None}

    def call(self, index: int, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.layers[index]
        if args or kwargs:
            self._waiting = None
        elif index == 0:
            self._waiting = None
            parts = self._fast_parts(x)
            if parts is not None:
                outs = list(lora_shared_input(x, parts, *recompute.source(self.norm, x)))
                first, outs[0] = outs[0], None
                self._waiting = (weakref.ref(x), x._version, outs)
                return first
        elif self._waiting is not None:
            ref, version, outs = self._waiting
            out, outs[index] = outs[index], None
            if all(o is None for o in outs):
                self._waiting = None
            if out is not None and ref() is x and x._version == version:
                return out
            self._waiting = None
        return type(layer).forward(layer, x, *args, **kwargs)

    def _fast_parts(self, x: Tensor) -> list[tuple] | None:
        if not torch.is_grad_enabled():
            return None
        parts = [_fast_weights(layer, x) for layer in self.layers]
        if any(p is None for p in parts):
            return None
        trains = x.requires_grad or any(t.requires_grad for p in parts for t in p[2:4])
        return parts if trains else None


def attach(model: nn.Module) -> None:
    """Fuse every SwiGLU MLP whose projections all carry adapters; in each decoder block, let the
    adapted projections that read a norm's output remake it in backward (lorakit.fast.recompute)."""
    for module in model.modules():
        if type(module).__name__ in DECODER_LAYERS:
            _link_norms(module)
            _share_attention_input(module)
    for module in model.modules():
        if type(module).__name__ not in SWIGLU_MLPS.values() or isinstance(module.__dict__.get("forward"), FusedSwiGLU):
            continue
        if all(isinstance(getattr(module, p, None), Linear) for p in PARTS) and _is_silu(module.act_fn):
            module.forward = FusedSwiGLU(module, module.__dict__.get(_MLP_NORM))


def _link_norms(block: nn.Module) -> None:
    """input_layernorm -> q/k/v of self_attn; post_attention_layernorm -> the MLP."""
    attn, mlp = block.self_attn, block.mlp
    for attr in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attn, attr, None)
        if isinstance(layer, Linear):
            recompute.tap(block.input_layernorm)
            layer.__dict__["input_norm"] = block.input_layernorm
    if all(isinstance(getattr(mlp, p, None), Linear) for p in PARTS):
        recompute.tap(block.post_attention_layernorm)
        mlp.__dict__[_MLP_NORM] = block.post_attention_layernorm


def _share_attention_input(block: nn.Module) -> None:
    """Group the adapted ones among q/k/v (two or three: PEFT's default for Llama is q and v)."""
    layers = tuple(layer for attr in QKV if isinstance(layer := getattr(block.self_attn, attr, None), Linear))
    if len(layers) < 2:
        return
    if any(isinstance(layer.__dict__.get("forward"), SharedInput.Member) for layer in layers):
        return
    group = SharedInput(layers, block.input_layernorm)
    for index, layer in enumerate(layers):
        layer.forward = SharedInput.Member(group, index)


def detach(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (FusedSwiGLU, SharedInput.Member)):
            del module.forward
        module.__dict__.pop(_MLP_NORM, None)
        if isinstance(module, Linear):
            module.__dict__["input_norm"] = None
        recompute.untap(module)
