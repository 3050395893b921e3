"""Special-token fixes every loaded tokenizer gets."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one, so batching works.

    A token already set is kept (SmolLM2 ships pad = eos = ``<|im_end|>``, as upstream).
    Otherwise pad = eos, falling back to unk (``<|endoftext|>`` in GPT-2-style vocabularies):
    padded positions are hidden by the attention mask and excluded from the loss by
    lorakit's loss mask, so reusing eos is harmless -- but never mask labels by pad id.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    return tokenizer
