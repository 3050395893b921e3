"""Fixtures for the CLI tests: a tiny model dir with a chat-template tokenizer, and adapters for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = "hello world table for two four friday at seven pm name is please book a the and".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama and a word-level tokenizer (eos `</s>`, a chat template), saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-chat-llama")
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "<s>", "user", "assistant", "system", ":", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=2, eos_token_id=1, pad_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def make_adapter(model_dir, out: Path, seed: int, **config) -> Path:
    """Save a random (non-zero B, scaled up so it visibly changes greedy output) adapter for
    `model_dir` (a model directory, or a model in memory: a 4-bit one, say)."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    base = model_dir if isinstance(model_dir, nn.Module) else AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                "init_lora_weights": False, **config}
    peft = get_peft_model(base, LoraConfig(**settings))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapters") / "alpha", seed=1)


@pytest.fixture(scope="session")
def adapter_dir_2(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapters") / "beta", seed=2, r=2)


@pytest.fixture(scope="session")
def adapter_factory():
    """`make_adapter` as a fixture (test modules cannot import this conftest by name)."""
    return make_adapter
