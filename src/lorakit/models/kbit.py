"""prepare_model_for_kbit_training: PEFT's function under its name and arguments, for lorakit's
4-bit models (quantize_model, load_model(quantization=...)) and transformers + bitsandbytes' ones.

What it does, in PEFT's order: freeze every parameter; optionally cast 16-bit parameters that are
not 4-bit storage to fp32; turn gradient checkpointing on with the given keyword arguments and,
for reentrant checkpointing, make the input embeddings' output require grad, so that a frozen
embedding still feeds a checkpointed block an input that takes a gradient (without it reentrant
checkpointing fails with "element 0 of tensors does not require grad").

Two differences from PEFT, on purpose:
- Embeddings, norms and the output head keep their dtype unless `upcast=True`. PEFT casts them to
  fp32, which doubles their memory: on a Llama-3.1-8B shape the untied embedding and head alone
  (1.05 B values) grow from 2.1 GB in bf16 to 4.2 GB. LoRA's adapters are fp32 either way, and
  lorakit's 16-bit products accumulate in fp32.
- Gradient checkpointing is turned on whenever asked. PEFT does so only for models transformers
  loaded in k bits (`is_loaded_in_4bit`), a flag lorakit's own 4-bit models do not carry.

`gradient_checkpointing_kwargs=None` checkpoints reentrantly, which is what PEFT's call ends up
doing (torch's default when `use_reentrant` is not given), here said explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..bases import bnb4bit

_HALF = (torch.float16, torch.bfloat16)


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True, *, upcast: bool = False,
) -> nn.Module:
    """Freeze `model`, optionally upcast its 16-bit non-quantized parameters (`upcast=True`, as PEFT
    always does) and turn on gradient checkpointing; returns the same model, changed in place.

    ValueError, before anything changes, when checkpointing is asked of a model that has none.
    `auto_clear_cache` (PEFT's) empties the CUDA cache after an upcast.
    """
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}  # a copy: the caller's dict is kept
    enable = checkpointing_switch(model) if use_gradient_checkpointing else None
    for param in model.parameters():
        param.requires_grad_(False)
    if upcast and upcast_half_params(model) and auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if enable is not None:
        enable(kwargs)
        if kwargs["use_reentrant"]:
            inputs_require_grad(model)
    return model


def checkpointing_switch(model: nn.Module) -> Callable[[dict[str, Any]], None]:
    """The call that turns the model's gradient checkpointing on with torch.utils.checkpoint kwargs."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        return lambda kwargs: model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if hasattr(model, "gradient_checkpointing_enable"):
        return lambda kwargs: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    raise ValueError(f"prepare_model_for_kbit_training: {type(model).__name__} has no gradient checkpointing "
                     "(gradient_checkpointing_enable); pass use_gradient_checkpointing=False")


def upcast_half_params(model: nn.Module) -> int:
    """Cast every fp16/bf16 parameter but 4-bit storage (bitsandbytes' Params4bit, whatever its
    quant_storage dtype) to fp32; returns how many were cast. lorakit's 4-bit codes are buffers."""
    packed = bnb4bit.params4bit_type()
    cast = 0
    for param in model.parameters():
        if param.dtype in _HALF and not (packed is not None and isinstance(param, packed)):
            param.data = param.data.float()
            cast += 1
    return cast


def inputs_require_grad(model: nn.Module) -> None:
    """The input embeddings' output requires grad (transformers' enable_input_require_grads, once)."""
    if getattr(model, "_require_grads_hooks", None):  # transformers' checkpointing switch did it already
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
