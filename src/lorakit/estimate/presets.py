"""Model configs to size without weights: published presets, a config.json, or a model directory.

Each preset copies the architecture fields of the model's published `config.json` (on its
Hugging Face hub page, cited per entry); fields that do not change any parameter or memory
figure (token ids, rope scaling, dropout) are left out. A test checks that every preset's
meta-device parameter count equals the model's published size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "llama-3.1-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    "llama-3.2-3b": {
        "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
    # https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
    # (the built-in `smollm2-135m`; a preset avoids converting its GGUF just to read the config)
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
}

# What a config must state for its parameter count to mean anything (transformers would
# otherwise fill a missing field with the config class's default and size a different model).
REQUIRED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_config_dict(model: str) -> tuple[str, dict[str, Any]]:
    """(label, config dict) for a preset name, a `config.json` file, or a directory holding one.

    Raises ValueError listing the presets for an unknown name, FileNotFoundError for a
    directory without config.json, and ValueError naming the first missing field.
    """
    key = str(model).strip().lower()
    if key in PRESETS:
        return key, dict(PRESETS[key])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model}: no config.json in this directory")
    elif not path.is_file():
        raise ValueError(
            f"unknown model {model!r}: not a preset, a config.json or a model directory; "
            f"presets: {', '.join(PRESETS)}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON config ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config.json must hold a JSON object")
    if "hidden_size" not in data and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # multimodal configs keep the language model's fields here
    check_fields(data, str(path))
    return str(model), data


def check_fields(data: dict[str, Any], source: str) -> None:
    """ValueError naming the first field the sizing needs that `data` lacks (aliases allowed)."""
    if "model_type" not in data:
        raise ValueError(f"{source}: missing field 'model_type' (needed to build the model)")
    aliases = _attribute_aliases(data["model_type"], source)
    for name in REQUIRED_FIELDS[1:] + _extra_fields(data["model_type"]):
        if name not in data and aliases.get(name) not in data:
            raise ValueError(f"{source}: missing field {name!r} (needed to size the model)")


def _attribute_aliases(model_type: str, source: str) -> dict[str, str]:
    """Standard field name -> this architecture's name for it (GPT-2: hidden_size -> n_embd)."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{source}: model_type {model_type!r} is not an architecture transformers knows")
    return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})


def _extra_fields(model_type: str) -> tuple[str, ...]:
    """intermediate_size when the architecture has one (GPT-2 derives it from the width instead)."""
    from transformers import CONFIG_MAPPING

    return ("intermediate_size",) if hasattr(CONFIG_MAPPING[model_type], "intermediate_size") else ()
