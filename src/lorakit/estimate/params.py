"""Exact parameter counts from a config: a meta-device model plus lorakit's own adapter injection.

Nothing is allocated or downloaded: transformers builds the architecture on the `meta` device
and `get_peft_model` matches targets with the engine's code, so the counts are the ones
`print_trainable_parameters` shows for the real model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .activations import Shape

METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class ParamCount:
    """PEFT's figures: `total` includes the adapter, `trainable` is what the optimizer updates."""

    total: int
    trainable: int

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        """The line `print_trainable_parameters` prints for these numbers."""
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


@dataclass(frozen=True)
class ModelFacts:
    """What sizing needs from the model: counts, which layers got adapters, tensors to save."""

    model_type: str
    shape: Shape
    params: ParamCount
    base_params: int  # parameters of the base model alone
    body_linears: tuple[int, ...]  # size of each Linear weight QLoRA stores in 4 bits (all but the output head)
    head_params: int  # the output layer's weight (its gradient arrives first in backward)
    tied_head: bool  # the head is the input embedding (its gradient is made twice and summed)
    fused_loss: bool  # lorakit's chunked linear cross-entropy applies (lorakit.fast.loss)
    adapted: dict[str, int]  # short name of each adapted layer (q_proj, …) -> rank, as in one layer
    adapter_tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (PEFT file key, shape) of the adapter

    @property
    def quantizable(self) -> int:
        """Weights QLoRA stores in 4 bits."""
        return sum(self.body_linears)

    @property
    def largest_linear(self) -> int:
        """The biggest of them (QLoRA de-quantises one at a time)."""
        return max(self.body_linears, default=0)


def model_facts(config: dict[str, Any], method: str, lora: dict[str, Any] | None) -> ModelFacts:
    """Count `config`'s parameters for `method` with LoRA settings `lora` (LoraConfig kwargs)."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    key = json.dumps([config, method, lora], sort_keys=True, default=str)
    return _cached_facts(key)


@lru_cache(maxsize=32)
def _cached_facts(key: str) -> ModelFacts:
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.lora.io import file_key
    from lorakit.fast.loss import fused_head
    from lorakit import bases

    config, method, lora = json.loads(key)
    model = _meta_model(config)
    output = model.get_output_embeddings()
    head = {n for n, m in model.named_modules() if output is not None and m is output}
    base_params = sum(p.numel() for p in model.parameters())
    body_linears = [
        m.weight.numel() for n, m in model.named_modules() if bases.is_linear(m) and n not in head
    ]
    head_params = sum(p.numel() for n in head for p in model.get_submodule(n).parameters())
    shape = decoder_shape(model.config)
    inputs = model.get_input_embeddings()
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    common = dict(model_type=model.config.model_type, shape=shape, base_params=base_params,
                  body_linears=tuple(body_linears), head_params=head_params, tied_head=tied)
    if method == "full":
        return ModelFacts(params=ParamCount(base_params, base_params), adapted={}, adapter_tensors=(),
                          fused_loss=fused_head(model) is not None, **common)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    trainable, total = peft_model.get_nb_trainable_parameters()
    state = peft_model.base_model.adapter_state("default")
    tensors = tuple(sorted((file_key(k, "default"), tuple(v.shape)) for k, v in state.items()))
    adapted: dict[str, int] = {}
    for name, layer in peft_model.base_model.lora_layers():
        adapted.setdefault(name.rsplit(".", 1)[-1], layer.r["default"])
    return ModelFacts(params=ParamCount(total, trainable), adapted=adapted, adapter_tensors=tensors,
                      fused_loss=fused_head(model) is not None, **common)


def _meta_model(config: dict[str, Any]):
    """The architecture on the meta device: shapes only, no memory, no download."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"cannot build a {config['model_type']!r} causal LM from this config: {err}") from None


def decoder_shape(config: Any) -> Shape:
    """The dimensions activations depend on, from a transformers config (any naming)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Shape(
        hidden=hidden,
        intermediate=intermediate,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
    )


def safetensors_file_bytes(tensors: tuple[tuple[str, tuple[int, ...]], ...], dtype_bytes: int = 4) -> int:
    """Size of the adapter's safetensors file: 8-byte length, JSON header padded to 8, data.

    Mirrors the safetensors layout (tensors sorted by name within one dtype, `{"format": "pt"}`
    metadata as lorakit writes it); a test checks it byte for byte against a saved adapter.
    """
    dtype = {4: "F32", 2: "BF16"}[dtype_bytes]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    data = 0
    for key, shape in sorted(tensors):
        size = dtype_bytes
        for dim in shape:
            size *= dim
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        data += size
    text = json.dumps(header, separators=(",", ":"))
    padded = len(text.encode()) + (-len(text.encode())) % 8
    return 8 + padded + data
