"""Fixtures for the server tests: the tiny model directory and adapters made for it (see serve_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_helpers import load_tiny, make_tokenizer
from tinymodels import tiny_llama


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve-tiny")
    tiny_llama(seed=0).to(torch.float64).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: Path) -> dict[str, Path]:
    """Four adapters of different ranks and targets (B non-zero, so each changes the output)."""
    from lorakit import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("serve-adapters")
    specs = {
        "a0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "a1": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "a2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
        "a3": dict(r=4, lora_alpha=16, target_modules="all-linear"),
    }
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        model, _ = load_tiny(serve_model_dir)
        torch.manual_seed(100 + i)
        peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec))
        dirs[name] = root / name
        peft.save_pretrained(dirs[name])
    # an adapter made for a different base (hidden size 48): must be refused on load
    torch.manual_seed(7)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(root / "misfit")
    dirs["misfit"] = root / "misfit"
    return dirs


