"""Tiny Llamas quantized by transformers + bitsandbytes (the oracle's 4-bit models, on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tinymodels import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BNB_WARNINGS = [pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning"),
                pytest.mark.filterwarnings("ignore:The 8-bit optimizer:UserWarning"),
                pytest.mark.filterwarnings("ignore:Input type into Linear4bit:UserWarning"),
                pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def save_llama(out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """tinymodels.tiny_llama() saved as a model directory (the weights both 4-bit bases quantize)."""
    tiny_llama().to(dtype).save_pretrained(out)
    return out


def bnb_llama(directory: Path, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
              quant_type: str = "nf4", dtype: torch.dtype | None = None) -> nn.Module:
    """The model directory loaded as PEFT users load it: transformers' BitsAndBytesConfig, 4 bits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu",
                                                **kwargs).eval()


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Every lora_A and lora_B weight random (B non-zero, so the adapter changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
