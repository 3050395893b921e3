"""Parameter counts: presets against published sizes, against real models, against PEFT."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.estimate import PRESETS, estimate
from lorakit.estimate.params import model_facts

# Each model's size as published (safetensors metadata on its hub page).
PUBLISHED_SIZES = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
}

TINY = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64,
}


def test_every_preset_has_its_published_size():
    assert set(PRESETS) == set(PUBLISHED_SIZES)
    for name, size in PUBLISHED_SIZES.items():
        assert estimate(name, "full").params.total == size, name


def test_smollm2_preset_matches_a_real_meta_model(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M-Instruct's architecture, typed in here independently of the preset
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.print_trainable_parameters()
    expected = capsys.readouterr().out.strip()
    result = estimate("smollm2-135m", "lora", rank=8, alpha=16, targets="all-linear")
    assert result.params.line() == expected
    assert set(result.adapted_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_smollm2_preset_equals_the_builtin_models_config():
    """The preset against the config.json of the embedded GGUF once converted (cached after the first run)."""
    from lorakit.models import resolve_model_path

    directory = resolve_model_path("smollm2-135m")
    from_dir = estimate(directory, "lora", targets="all-linear")
    from_preset = estimate("smollm2-135m", "lora", targets="all-linear")
    assert from_dir.params == from_preset.params
    assert from_dir.memory == from_preset.memory


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["gate_proj", "down_proj"]])
def test_counts_match_peft(targets, capsys):
    from tinymodels import tiny_llama

    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    reference.print_trainable_parameters()
    expected = capsys.readouterr().out.strip()
    assert estimate(TINY, "lora", rank=4, alpha=8, targets=targets).params.line() == expected


def test_default_targets_follow_the_engine():
    assert estimate("mistral-7b", "lora").adapted_modules == ("q_proj", "v_proj")  # PEFT's default for Mistral


def test_qlora_counts_like_lora_and_quantises_only_body_linears():
    lora = estimate("llama-3.2-1b", "lora", targets="all-linear")
    qlora = estimate("llama-3.2-1b", "qlora", targets="all-linear")
    assert qlora.params == lora.params
    facts = model_facts(PRESETS["llama-3.2-1b"], "full", None)
    embedding = 128256 * 2048  # tied with the head: stays in bf16
    norms = (2 * 16 + 1) * 2048
    assert facts.quantizable == facts.base_params - embedding - norms


def test_adapter_file_size_is_exact(tmp_path):
    """The estimated size against the file lorakit writes, byte for byte."""
    from tinymodels import tiny_llama

    for targets in (["q_proj", "v_proj"], "all-linear"):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        directory = tmp_path / str(len(targets))
        model.save_pretrained(directory)
        size = os.path.getsize(directory / "adapter_model.safetensors")
        assert estimate(TINY, "lora", rank=4, alpha=8, targets=targets).adapter_file_bytes == size


def test_config_json_and_directory_give_the_preset_counts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-3.2-1b"]))
    by_file = estimate(tmp_path / "config.json", "lora")
    by_dir = estimate(tmp_path, "lora")
    by_name = estimate("llama-3.2-1b", "lora")
    assert by_file.params == by_dir.params == by_name.params
    assert by_file.memory == by_name.memory


def test_multimodal_config_uses_its_text_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "some_vlm", "text_config": PRESETS["smollm2-135m"]}))
    assert estimate(path, "full").params.total == PUBLISHED_SIZES["smollm2-135m"]
