"""Memory of the causal-LM loss at its peak, for the two ways lorakit computes it (lorakit.fast.loss).

Fused (`linear_cross_entropy`, for plain-head architectures): the logits exist one chunk of
tokens at a time (`causal_lm_loss`'s default chunk, read from the engine), and the gradient of
the hidden states (and of the head, when it trains) is made already in forward. Plain (other
heads): whole fp32 logits, log-softmax and NLL. Both score seq - 1 positions per row (the last
token has no target).
"""

from __future__ import annotations

import inspect

from .activations import Shape


def engine_chunk() -> int:
    """The chunk (tokens) lorakit's training loss uses by default."""
    from lorakit.fast.loss import causal_lm_loss

    return inspect.signature(causal_lm_loss).parameters["chunk"].default


def fused_loss_bytes(shape: Shape, batch: int, seq: int, b: int, head_trains: bool, chunk: int | None = None) -> int:
    """Peak of lorakit's chunked linear cross-entropy over the activations (b: dtype bytes).

    Forward holds the final hidden states (and, for batch > 1, the flattened copy of the scored
    positions) and the hidden-state gradient it fills. The logits of every chunk go into one
    b-byte buffer and are worked on in place: 4 bytes per (token, vocab) entry in fp32; in 16-bit
    the buffer, its fp32 copy and the probabilities cast back, 4 + 2b. When the head trains: an
    fp32 gradient accumulator and each chunk's (vocab x hidden) product. Backward scales both
    gradients into new tensors.
    """
    scored = batch * (seq - 1)
    rows = min(chunk or engine_chunk(), scored)
    h, v = shape.hidden, shape.vocab
    upcast = b if b != 4 else 0  # extra b-byte copies when the dtype is not fp32 already
    hidden = b * batch * seq * h + (b * scored * h if batch > 1 else 0)
    grad_hidden = b * scored * h
    chunks = rows * v * (b + (4 + b if upcast else 0))
    if not head_trains:
        return max(hidden + grad_hidden + chunks, 2 * grad_hidden)
    accumulator = 4 * v * h
    head_product = rows * v * (4 + upcast) + v * h * (4 + upcast)
    forward = hidden + grad_hidden + accumulator + max(chunks, head_product)
    backward = 2 * grad_hidden + accumulator + v * h * (4 + upcast)
    return max(forward, backward)


def plain_loss_bytes(shape: Shape, batch: int, seq: int) -> int:
    """Peak of the plain loss at the start of backward: three fp32 (positions x vocab) tensors.

    log-softmax's output (kept from forward), NLL's gradient and log-softmax's gradient, plus
    the int64 targets; the b-byte logits and their fp32 copy are gone by then.
    """
    scored = batch * (seq - 1)
    return scored * (3 * 4 * shape.vocab + 8)
