"""lorakit: fast, light LoRA fine-tuning for PyTorch, with PEFT-compatible adapters.

The public names load on first use, so that `lorakit --help` does not wait for torch.
transformers' Trainer and TRL's SFTTrainer / DPOTrainer for lorakit models: `lorakit.integrations`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BASE": "lora.routing",
    "Estimate": "estimate",
    "LoftQConfig": "lora.config",
    "LoraConfig": "lora.config",
    "LoraModel": "lora.model",
    "PeftModel": "lora.peft_model",
    "QuantConfig": "bases.quant_config",
    "RequantizeReport": "lora.quantized_merge",
    "get_peft_model": "lora.peft_model",
    "estimate": "estimate",
    "frozen_matmul_precision": "fast.precision",
    "load_model": "models.load",
    "load_quantized": "models.quantized",
    "prepare_model_for_kbit_training": "models.kbit",
    "quantize_model": "models.quantize",
    "save_quantized": "models.quantized",
}
# PEFT's task-specific class is the same handle here: lorakit passes every call through.
_ALIASES = {"PeftModelForCausalLM": ("lora.peft_model", "PeftModel")}

__all__ = sorted([*_EXPORTS, *_ALIASES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
    elif name in _ALIASES:
        module_name, attr = _ALIASES[name]
        value = getattr(importlib.import_module(f".{module_name}", __name__), attr)
    else:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
