"""The causal-LM training loss, computed without materialising the full logits when possible.

`causal_lm_loss` returns the *sum* of token losses and the number of target tokens, so that a
step can divide by the tokens of the whole optimizer step (grad accumulation, several ranks)
and get the same number however the batch is split. The count is a tensor on the labels'
device: turning it into a Python int would wait for the GPU at every micro-batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import linear_cross_entropy

IGNORE = -100
# Model types whose logits are exactly `hidden @ lm_head.weight^T` (no soft-capping or scaling).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "olmo", "olmo2"}


def _unwrap(model: nn.Module) -> tuple[nn.Module, object]:
    """The transformers model inside a PeftModel, and the context that routes its adapters."""
    from ..lora.peft_model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model, model.adapter_scope()
    return model, nullcontext()


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder body, plain linear head) when the fused loss applies, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or type(head) is not nn.Linear or head.bias is not None:
        return None  # e.g. a LoRA-wrapped or trainable-copy head: use the plain path
    return body, head


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], chunk: int = 256) -> tuple[Tensor, Tensor]:
    """(sum of next-token cross-entropies over labels != -100, number of such tokens as a 0-dim tensor)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]
    n_tokens = (target != IGNORE).sum()
    inner, scope = _unwrap(model)
    fused = fused_head(inner)
    with scope:
        if fused is not None:
            body, head = fused
            hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]
            return linear_cross_entropy(hidden, head.weight, target, chunk=chunk), n_tokens
        logits = inner(**inputs, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return loss, n_tokens
