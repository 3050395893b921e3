"""One table of model families: what lorakit knows about each `model.config.model_type`.

- `targets`: PEFT's default `target_modules` when a config leaves them None (values as published
  in PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
- `plain_head`: the logits are exactly `hidden @ lm_head.weight^T` (no soft-capping or scaling),
  so the fused head + loss (`fast.loss`) may replace them.
- `blocks`: the transformers module whose `<Prefix>DecoderLayer` runs input_layernorm ->
  self_attn (q_proj, k_proj, v_proj called in that order on one tensor) and
  post_attention_layernorm -> `<Prefix>MLP`, whose forward is exactly
  down_proj(act_fn(gate_proj(x)) * up_proj(x)): the block fusions (`fast.fusion`) know them.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    targets: tuple[str, ...] | None = None
    plain_head: bool = False
    blocks: tuple[str, str] | None = None  # (transformers module, class prefix)


_QV = ("q_proj", "v_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family(_QV, plain_head=True, blocks=("transformers.models.llama.modeling_llama", "Llama")),
    "mistral": Family(_QV, plain_head=True, blocks=("transformers.models.mistral.modeling_mistral", "Mistral")),
    "qwen2": Family(_QV, plain_head=True, blocks=("transformers.models.qwen2.modeling_qwen2", "Qwen2")),
    "qwen3": Family(_QV, plain_head=True, blocks=("transformers.models.qwen3.modeling_qwen3", "Qwen3")),
    "mixtral": Family(_QV, plain_head=True),
    "gemma": Family(_QV),
    "gemma2": Family(_QV),
    "gemma3_text": Family(_QV),
    "phi": Family(("q_proj", "v_proj", "fc1", "fc2")),
    "phi3": Family(plain_head=True),
    "opt": Family(_QV),
    "gpt2": Family(("c_attn",), plain_head=True),
    "gpt_neox": Family(("query_key_value",), plain_head=True),
    "olmo": Family(plain_head=True),
    "olmo2": Family(plain_head=True),
    "bloom": Family(("query_key_value",)),
    "falcon": Family(("query_key_value",)),
    "bert": Family(("query", "value")),
    "t5": Family(("q", "v")),
}

DEFAULT_TARGETS: dict[str, list[str]] = {name: list(f.targets) for name, f in FAMILIES.items() if f.targets}
FUSED_BLOCK_TYPES = frozenset(name for name, f in FAMILIES.items() if f.blocks)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def family(model: nn.Module) -> Family | None:
    return FAMILIES.get(model_type(model))


@functools.cache
def block_classes(kind: str) -> tuple[type, type] | None:
    """(decoder layer class, MLP class) of a model type with known blocks, from transformers itself
    (classes, not names: a user's own class called LlamaMLP is not taken for transformers')."""
    blocks = FAMILIES[kind].blocks if kind in FAMILIES else None
    if blocks is None:
        return None
    module_name, prefix = blocks
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}MLP")
