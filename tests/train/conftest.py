"""A tiny random Llama with a byte-level ChatML tokenizer, saved as a model dir, and chat data for it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_model(out: Path) -> Path:
    """One token per byte plus <|im_start|> and <|im_end|> (eos, also the pad, as in SmolLM2)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    """Chat records with a learnable answer: the user's word, reversed."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
            messages = [{"role": "user", "content": f"reverse {word}"},
                        {"role": "assistant", "content": word[::-1]}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", 24)


@pytest.fixture
def base_config(tiny_model: Path, train_file: Path, tmp_path: Path) -> dict:
    """Options for a fast run on the tiny model; tests override what they exercise."""
    return dict(model=str(tiny_model), data=str(train_file), output_dir=str(tmp_path / "run"),
                batch_size=4, max_seq_len=64, lr=1e-2, quiet=True, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train ~40x faster on one thread than on two busy-waiting ones on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
