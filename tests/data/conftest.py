"""Tiny offline tokenizers: byte-level BPE built in memory, with a ChatML template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(
    merges: list[tuple[str, str]] = (), chat_template: str | None = CHATML, bos: bool = False
) -> PreTrainedTokenizerFast:
    """One token per byte (plus ``merges``), specials <|im_start|> <|im_end|> <|pad|> <s>."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if bos:
        bos_id = tokenizer.bos_token_id
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|pad|>",
            additional_special_tokens=["<|im_start|>"],
        )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """No chat template; adds <s> like Llama-style tokenizers do."""
    return byte_tokenizer(chat_template=None, bos=True)



@pytest.fixture(scope="session")
def make_tokenizer():
    """The factory itself, for tests that need other merges or templates."""
    return byte_tokenizer
