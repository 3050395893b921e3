"""Block-level fast paths for decoders whose blocks `arch.FAMILIES` knows (Llama, Mistral, Qwen2/3).

- The MLP as one autograd node: its own forward, down(act(gate(x)) * up(x)), keeps four
  (tokens, intermediate) tensors alive for backward; `kernels.lora_swiglu` keeps two. In
  inference it skips three module calls per layer, which decoding feels. The fused kernel runs
  whenever the three projections are on the single-adapter fast path; the module's own forward
  otherwise (mixed batches, merged or disabled adapters, dropout in training, DoRA).
- q, k and v (those of them with adapters, two or three) as one autograd node in training
  (`kernels.lora_shared_input`): they read the same input, so backward makes one A-gradient
  matmul for all and adds their input gradients up in place. The attention calls q_proj,
  k_proj, v_proj in that order on one tensor; the first call computes the group's outputs and
  the next ones take theirs, when the input, its version, the thread and the route are the same.
- Norm outputs remade in backward (`fast.recompute`): q/k/v learn which norm they read, and
  the fused MLP too.

`attach(model)` installs these as instance `forward`s (so state_dict keys, deepcopy and pickling
are untouched); `detach(model)` removes every one of them and restores the modules' own. The
LoRA model attaches them when adapters are added, unless it was made with `fuse=False`.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

from ..arch import block_classes, model_type
from ..lora.linear import Linear
from ..lora.routing import current_route
from . import recompute
from .kernels import Adapted, common_work_dtype, lora_shared_input, lora_swiglu

PARTS = ("gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")
_MLP_NORM = "_lorakit_input_norm"


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _fast_ops(layers, x: Tensor) -> list[Adapted] | None:
    """Each layer's fast-path op for input x, when all have one and their bases share a compute
    dtype; None when any layer needs its general path."""
    plans = [layer.call_plan() for layer in layers]
    if any(p is None for p in plans):
        return None
    ops = [p.adapted() for p in plans]
    if ops[0].A.dtype != ops[0].B.dtype or common_work_dtype(ops) is None:
        return None
    return ops


class FusedSwiGLU:
    """Stands in for an MLP's `forward`."""

    def __init__(self, mlp: nn.Module, norm: nn.Module | None = None) -> None:
        self.mlp = mlp
        self.norm = norm  # the norm whose output the MLP reads (fast.recompute)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        mlp = self.mlp
        ops = None if args or kwargs else _fast_ops([getattr(mlp, p) for p in PARTS], x)
        if ops is None or any(op.base.bias is not None for op in ops):  # no biases in the fused kernel
            return type(mlp).forward(mlp, x, *args, **kwargs)
        return lora_swiglu(x, *ops, keep=recompute.source(self.norm, x))


class SharedInput:
    """The adapted ones among q, k and v of one attention block (see the module docstring), in
    the order the attention calls them; each one's `forward` is a `SharedInput.Member`."""

    class Member:
        def __init__(self, group: SharedInput, index: int) -> None:
            self.group, self.index = group, index

        def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
            group = self.group
            if not group._waiting and (self.index or not torch.is_grad_enabled()):  # inference: no detour
                layer = group.layers[self.index]
                return type(layer).forward(layer, x, *args, **kwargs)
            return group.call(self.index, x, *args, **kwargs)

    def __init__(self, layers: tuple[Linear, ...], norm: nn.Module | None) -> None:
        self.layers = layers
        self.norm = norm
        # per thread: (weakref to the input, its version, the route, outputs not yet taken)
        self._waiting: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_waiting": {}}

    def call(self, index: int, x: Tensor, *args, **kwargs) -> Tensor:
        layer, thread = self.layers[index], threading.get_ident()
        waiting = self._waiting.pop(thread, None)
        if args or kwargs:
            pass
        elif index == 0:
            ops = self._fast_ops(x)
            if ops is not None:
                outs = list(lora_shared_input(x, ops, keep=recompute.source(self.norm, x)))
                first, outs[0] = outs[0], None
                self._waiting[thread] = (weakref.ref(x), x._version, current_route(), outs)
                return first
        elif waiting is not None:
            ref, version, route, outs = waiting
            out, outs[index] = outs[index], None
            same = ref() is x and x._version == version and current_route() is route
            if same and any(o is not None for o in outs):
                self._waiting[thread] = waiting
            if out is not None and same:
                return out
            self._waiting.pop(thread, None)
        return type(layer).forward(layer, x, *args, **kwargs)

    def _fast_ops(self, x: Tensor) -> list[Adapted] | None:
        if not torch.is_grad_enabled():
            return None
        ops = _fast_ops(self.layers, x)
        if ops is None:
            return None
        trains = x.requires_grad or any(t.requires_grad for op in ops for t in (op.A, op.B))
        return ops if trains else None


def attach(model: nn.Module) -> None:
    """Fuse every known SwiGLU MLP whose projections all carry adapters; in each known decoder
    block, group the adapted q/k/v and let the layers reading a norm's output remake it in backward."""
    classes = block_classes(model_type(model) or "")
    if classes is None:
        return
    decoder_cls, mlp_cls = classes
    for module in model.modules():
        if type(module) is decoder_cls:
            _link_norms(module)
            _share_attention_input(module)
    for module in model.modules():
        if type(module) is not mlp_cls or isinstance(module.__dict__.get("forward"), FusedSwiGLU):
            continue
        if all(isinstance(getattr(module, p, None), Linear) for p in PARTS) and _is_silu(module.act_fn):
            module.forward = FusedSwiGLU(module, module.__dict__.get(_MLP_NORM))


def _link_norms(block: nn.Module) -> None:
    """input_layernorm -> q/k/v of self_attn; post_attention_layernorm -> the MLP."""
    attn, mlp = block.self_attn, block.mlp
    for attr in QKV:
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
    if len(layers) < 2 or any(isinstance(layer.__dict__.get("forward"), SharedInput.Member) for layer in layers):
        return
    group = SharedInput(layers, block.input_layernorm)
    for index, layer in enumerate(layers):
        layer.forward = SharedInput.Member(group, index)


def detach(model: nn.Module) -> None:
    """Remove everything `attach` installed; every module runs its own forward again."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (FusedSwiGLU, SharedInput.Member)):
            del module.forward
        module.__dict__.pop(_MLP_NORM, None)
        if isinstance(module, Linear):
            module.__dict__["input_norm"] = None
        recompute.untap(module)


def attached(model: nn.Module) -> bool:
    return any(isinstance(m.__dict__.get("forward"), (FusedSwiGLU, SharedInput.Member)) for m in model.modules())
