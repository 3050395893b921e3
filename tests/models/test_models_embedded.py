"""The real built-in SmolLM2-135M: conversion, layout, the Paris answer, reloads from the cache.

Uses the user's default cache so the ~30 s conversion happens once per machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lorakit.models import load_model, resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    start = time.perf_counter()
    path = Path(resolve_model_path("smollm2-135m"))
    print(f"\nsmollm2-135m ready in {time.perf_counter() - start:.1f} s at {path}")
    return path


def test_converted_dir_loads_with_plain_transformers(smollm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in config  # else loads would look for the GGUF again
    model = AutoModelForCausalLM.from_pretrained(smollm_dir)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert model.model.embed_tokens.weight.abs().sum() > 0
    assert any(smollm_dir.glob("*.safetensors"))


def test_saved_tokenizer_special_tokens(smollm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"  # as upstream SmolLM2
    assert tok.model_max_length == 8192


def test_answers_paris(smollm_dir: Path) -> None:
    model, tok = load_model("smollm2-135m", device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_second_load_reads_only_the_cache(smollm_dir: Path, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first load, neither the blocks nor the dense conversion parse the GGUF again (the
    metadata parse alone takes seconds): the packed load reads the cached header, the dense one the
    converted directory."""
    import gguf

    from lorakit.models import gguf as gguf_module
    from lorakit.models import gguf_header

    load_model("smollm2-135m", device="cpu", packed=packed)
    gguf_header._header.cache_clear()  # as in a new process

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    for owner, name in ((gguf, "GGUFReader"), (gguf_header, "open_gguf"), (gguf_module, "convert_gguf")):
        monkeypatch.setattr(owner, name, refuse)
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m", device="cpu", packed=packed)
    print(f"\nsecond load ({'packed' if packed else 'dense'}): {time.perf_counter() - start:.2f} s")
    assert model.dtype is torch.float32
    assert any(type(m).__name__ == "GGUFLinear" for m in model.modules()) is packed
