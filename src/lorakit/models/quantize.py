"""Storing a model's linear layers in 4 bits: every nn.Linear becomes lorakit's Linear4bit.

As transformers does for bitsandbytes, the output head (and so a head tied to the input
embeddings) stays dense, and so does every module named in `QuantConfig.skip_modules`.
"""

from __future__ import annotations

from torch import nn

from ..bases.linear4bit import quantize_linear
from ..bases.quant_config import QuantConfig


def names_match(name: str, key: str) -> bool:
    """True when dotted `key` is a run of whole components of module `name` ("lm_head",
    "mlp.down_proj", "layers.0"), the way skip lists name modules."""
    return f".{key}." in f".{name}."


def kept_dense(model: nn.Module, config: QuantConfig) -> set[str]:
    """Names of the nn.Linear modules that stay dense: the output head and the skipped ones."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    skip = config.skip_modules or ()
    return {
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (module is head or any(names_match(name, key) for key in skip))
    }


def linear_targets(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the nn.Linear modules `quantize_model` replaces, in model order."""
    dense = kept_dense(model, config)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in dense]


def check_targets(targets: list[str], config: QuantConfig) -> None:
    """ValueError when `linear_targets` found nothing to quantize."""
    if not targets:
        raise ValueError(f"no nn.Linear layer left to quantize (the output head is kept; skip_modules={config.skip_modules!r})")


def quantize_model(model: nn.Module, config: QuantConfig | str = "nf4") -> nn.Module:
    """Replace the model's nn.Linear layers by Linear4bit, in place, one layer at a time; returns it.

    The weights are quantized on their own device, so memory holds one full-precision layer
    beyond the model at a time. ValueError, and the model untouched, when nothing is left to
    quantize.
    """
    config = QuantConfig.coerce(config)
    targets = linear_targets(model, config)
    check_targets(targets, config)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, quantize_linear(linear, config.quant_type, config.blocksize, config.double_quant,
                                               config.compute_dtype))
    return model
