"""lorakit: fast, light LoRA fine-tuning for PyTorch, with PEFT-compatible adapters."""

from .config import LoraConfig
from .estimate import Estimate, estimate
from .model import LoraModel
from .peft_model import PeftModel, get_peft_model
from .routing import BASE

__version__ = "0.1.0"

# PEFT's task-specific classes are the same handle here: lorakit passes every call through.
PeftModelForCausalLM = PeftModel

__all__ = [
    "BASE",
    "Estimate",
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "estimate",
    "get_peft_model",
    "__version__",
]
