"""The causal-LM training loss, computed without materialising the full logits when possible.

`linear_cross_entropy` is the loss of a linear head without ever holding the (tokens, vocab)
logits: chunk by chunk it computes the loss and, already in forward, the gradient for the hidden
states, so backward is a multiplication. Positions without a label (prompt, padding) never
reach the head.

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

from .. import bases
from ..arch import family
from ..bases.compute import autocast_compute_dtype, product_dtype
from .amp import autocast_dtype, autocast_off, exact_backward
from .precision import frozen_level, products

IGNORE = -100


def _unwrap(model: nn.Module) -> tuple[nn.Module, object]:
    """The transformers model inside a PeftModel, and the context that routes its adapters."""
    from ..lora.peft_model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model, model.adapter_scope()
    return model, nullcontext()


def fused_head(model: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """(decoder body, the head's (vocab, dim) weight) when the fused loss applies, else None."""
    kind = family(model)
    if kind is None or not kind.plain_head:
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = bases.frozen_base(head) if isinstance(head, nn.Module) else None
    if body is None or base is None or not base.fast or base.transposed or base.bias is not None:
        return None  # e.g. a LoRA-wrapped or trainable-copy head: use the plain path
    return body, base.dense()


# what `model(**kwargs)` may be called with for the fused loss to stand in for transformers' own
_PLAIN_CALL = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "use_cache",
                         "num_items_in_batch"})


def fused_output(model: nn.Module, kwargs: dict):
    """`model(**kwargs)` in training with labels, its loss from the fused head: transformers' loss
    (the mean over labelled tokens, or their sum / `num_items_in_batch` as Trainer asks), without
    the (tokens, vocab) logits, which come back as None. None when it does not apply: not
    training, no labels, other arguments, or a head the fused loss does not cover. Under
    torch.autocast (Trainer's bf16/fp16) the head's product runs as autocast would run it."""
    labels = kwargs.get("labels")
    if labels is None or not (model.training and torch.is_grad_enabled()) or not set(kwargs) <= _PLAIN_CALL:
        return None
    fused = fused_head(model)
    if fused is None:
        return None
    from transformers.modeling_outputs import CausalLMOutputWithPast

    body, weight = fused
    inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch", "use_cache")}
    target = labels[:, 1:]
    hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]
    total = linear_cross_entropy(hidden, weight, target, chunk=256)
    count = kwargs.get("num_items_in_batch")
    return CausalLMOutputWithPast(loss=total / (count if count is not None else (target != IGNORE).sum()))


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
            body, weight = fused
            hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]
            return linear_cross_entropy(hidden, weight, target, chunk=chunk), n_tokens
        logits = inner(**inputs, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return loss, n_tokens


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, level: str,
                work: torch.dtype) -> Tensor:
        # hidden (tokens, dim), weight (vocab, dim), labels (tokens,): every label a class index;
        # the products in `work` (16-bit heads multiply in fp32 where emulated)
        w = weight.detach().to(work)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        # One logits buffer for every chunk, worked on in place: a (chunk, vocab) tensor is above
        # malloc's mmap threshold, so each fresh one would be mapped and page-faulted in anew.
        buffer = hidden.new_empty((min(chunk, hidden.shape[0]), weight.shape[0]), dtype=work)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(work)
            y = labels[start : start + chunk]
            rows = torch.arange(len(y), device=y.device)
            with products(level):
                logits = torch.mm(h, w.t(), out=buffer[: len(h)]).float()  # (chunk, vocab)
            target = logits[rows, y]
            # log-sum-exp by hand, so that exp(logits - max) is computed once, in place, and is
            # also the softmax the gradient needs
            peak = logits.amax(dim=1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=1, keepdim=True)
            total += (peak.squeeze(1) + sums.log().squeeze(1) - target).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            probs = exps.div_(sums)  # d loss / d logits = softmax - onehot
            probs[rows, y] -= 1
            probs = probs.to(work)
            if grad_hidden is not None:
                with products(level):
                    grad_hidden[start : start + chunk] = probs @ w
            if grad_weight is not None:
                grad_weight += (probs.t() @ h).float()
            del logits, exps, probs
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @exact_backward
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Sum over non-ignored tokens of cross-entropy(hidden @ weight^T, labels), logits never held whole.

    hidden (..., dim) and labels (...) are already aligned (shifted) by the caller. Only the
    positions with a label go through the head: in instruction tuning the prompt's tokens (and any
    padding) are ignored, and the head's (tokens, vocab) products are a fifth of a small model's
    step. Finding them costs one device synchronisation on a GPU. Under torch.autocast the head
    multiplies as autocast would run it (hidden in the autocast dtype; `fast.amp`), the loss in fp32.
    """
    amp = autocast_dtype(hidden.device)
    if amp is not None:
        with autocast_off(hidden.device):
            work = autocast_compute_dtype(weight.dtype, amp, weight.device)
            return _linear_cross_entropy(hidden.to(amp), weight, labels, chunk, work)
    return _linear_cross_entropy(hidden, weight, labels, chunk, product_dtype(weight.dtype, weight.device))


def _linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, work: torch.dtype) -> Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    scored = (labels != -100).nonzero().squeeze(1)
    if len(scored) < len(labels):  # the kernel sees class indices only
        hidden, labels = hidden.index_select(0, scored), labels.index_select(0, scored)
    # reduced products only in training (evaluation compares runs: keep it exact)
    trains = hidden.requires_grad and torch.is_grad_enabled() and not weight.requires_grad
    level = frozen_level(work) if trains else "highest"
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, level, work)
