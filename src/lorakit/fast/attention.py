"""Attention in fp32 for a 16-bit model on a CPU that only emulates 16-bit products.

The frozen bases already multiply in their compute dtype (`bases.compute`); attention is
transformers' own `scaled_dot_product_attention`, which in bf16 on an AVX2 CPU took 4.3 s of a
12.2 s SmolLM2 training step (4 x 256 tokens), most of it in backward. `attach(model)` makes such
a model's attention upcast q, k and v to fp32 and cast the output back (in training, backward
keeps the 16-bit q, k, v and recomputes the fp32 forward), through transformers' documented
`AttentionInterface` (registered once, under `NAME`, chosen per model in its config);
`detach(model)` gives the model back the implementation it had. Models whose products are native
(GPUs, CPUs with AMX/AVX512-BF16, fp32 models) are left as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..bases.compute import product_dtype

NAME = "lorakit_sdpa_compute_dtype"
_BEFORE = "_lorakit_attn_before"


def _forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    work = product_dtype(dtype, query.device)
    if work == dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def upcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None and mask.is_floating_point():
            mask = mask.to(work)
        return sdpa_attention_forward(module, q.to(work), k.to(work), v.to(work), mask, **kwargs)[0].to(dtype)

    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        # backward keeps q, k, v in 16 bits and runs the fp32 attention again (cheap beside its
        # backward) instead of keeping fp32 copies of q, k, v and the output
        return checkpoint(upcast, query, key, value, attention_mask, use_reentrant=False), None
    return upcast(query, key, value, attention_mask), None


@functools.cache
def _registered() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers before the attention interface: keep its own attention
        return False
    AttentionInterface.register(NAME, _forward)
    return True


def attach(model: nn.Module) -> bool:
    """Route a 16-bit sdpa model's attention through `_forward` where its products are emulated."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    if product_dtype(weight.dtype, weight.device) == weight.dtype or not _registered():
        return False
    model.__dict__[_BEFORE] = config._attn_implementation
    config._attn_implementation = NAME
    return True


def detach(model: nn.Module) -> None:
    before = model.__dict__.pop(_BEFORE, None)
    if before is not None:
        model.config._attn_implementation = before
