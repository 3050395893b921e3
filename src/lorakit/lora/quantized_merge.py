"""`merge_and_unload` over quantized bases (4-bit layers, GGUF blocks): merge onto the weights
the adapter was trained against, the de-quantized ones, and come back dense or quantized again.

A quantized base refuses merges in place (`merge_adapter`): its weight is stored as codes. Here
each adapted quantized layer is, one at a time: de-quantized into an fp32 nn.Linear (exact: the
de-quantized values are those of its weight dtype), merged as any dense layer (in fp32), then

- cast once to `dtype` (default: the weight dtype it was quantized from), or
- with `requantize=True`, quantized again with the layer's own settings (quant type, blocksize,
  double quant, weight and compute dtypes; a GGUF layer's block type). The change that causes,
  |W_requantized - W_merged| over every requantized weight, is summed up in a `RequantizeReport`:
  logged, and kept on the returned model as `model.lorakit_requantize_report`.

Quantized layers without an adapter: de-quantized too (to `dtype`, default their weight dtype),
so the result is a plain model whose `save_pretrained` transformers loads without bitsandbytes;
with `requantize=True` they stay as they are. Memory holds one extra fp32 layer at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..bases import QuantizedBase, frozen_base
from ..bases.compute import named_dtype

if TYPE_CHECKING:
    from .model import LoraModel

REPORT_ATTR = "lorakit_requantize_report"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
log = logging.getLogger("lorakit")


@dataclass(frozen=True)
class RequantizeReport:
    """The rounding that quantizing the merged weights again caused, over every requantized layer."""

    layers: int  # adapted quantized layers quantized again
    weights: int  # their number of weights
    max_abs_change: float  # max |W_requantized - W_merged|, W_merged the exact (fp32) merged weight
    mean_abs_change: float  # mean of the same over all `weights`
    max_abs_weight: float  # max |W_merged|, for scale
    worst_layer: str | None  # where max_abs_change is

    def line(self) -> str:
        if not self.layers:
            return "requantized no layer: no adapter is merged into a quantized layer"
        return (f"requantized {self.layers} merged layer(s), {self.weights:,} weights: |change| max "
                f"{self.max_abs_change:.3g} (in {self.worst_layer}), mean {self.mean_abs_change:.3g}; "
                f"largest |weight| {self.max_abs_weight:.3g}")


class _Tally:
    def __init__(self) -> None:
        self.layers = self.weights = 0
        self.total = self.max = self.scale = 0.0
        self.worst: str | None = None

    def add(self, name: str, merged: torch.Tensor, requantized: torch.Tensor) -> None:
        change = (requantized.double() - merged.double()).abs()
        self.layers += 1
        self.weights += change.numel()
        self.total += float(change.sum())
        self.scale = max(self.scale, float(merged.abs().max()))
        if self.worst is None or float(change.max()) > self.max:
            self.max, self.worst = float(change.max()), name

    def report(self) -> RequantizeReport:
        return RequantizeReport(self.layers, self.weights, self.max, self.total / max(self.weights, 1), self.scale,
                                self.worst)


def quantized(module: nn.Module) -> QuantizedBase | None:
    """The module's base when it is a quantized one that can stand in a dense layer for a merge."""
    base = frozen_base(module)
    return base if isinstance(base, QuantizedBase) and not base.mergeable else None


def has_quantized(model: nn.Module) -> bool:
    return any(quantized(m) is not None for m in model.modules())


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    try:
        return named_dtype(dtype, _DTYPES)
    except LookupError:
        pass
    raise ValueError(f"merge_and_unload: dtype must be float32, bfloat16, float16 or float64, not {dtype!r}")


def merge_and_unload(owner: LoraModel, names: Sequence[str], *, safe_merge: bool = False, dtype: torch.dtype | str | None = None,
                     requantize: bool = False) -> nn.Module:
    """LoraModel.merge_and_unload for a model with quantized layers (see the module docstring).

    Everything is checked before the model changes: the adapter names, bases that refuse
    merging altogether, the arguments (and with `requantize` whether every layer can be quantized
    again: gguf-py writes no K-quant), and with `safe_merge` every merged weight.
    """
    from .linear import Linear

    names = list(names)
    for name in names:
        owner._check_name(name)
    dtype = _dtype(dtype)
    layers = list(owner.lora_layers())
    on_quantized = {n for n, l in layers if isinstance(l, Linear) and quantized(l.base_layer) is not None}
    four = [(n, l) for n, l in layers if n in on_quantized and l._pending(names)]
    dense = [l for n, l in layers if n not in on_quantized]
    for layer in dense:
        layer.check_mergeable()  # a base that refuses any merge refuses here, first
    if requantize and dtype is not None:
        raise ValueError("merge_and_unload: dtype applies to layers that come back de-quantized; with requantize=True "
                         "they stay quantized (cast the rest of the model with .to())")
    if (requantize or dtype is not None) and not has_quantized(owner.model):
        what = "requantize=True" if requantize else f"dtype={dtype}"
        raise ValueError(f"merge_and_unload: {what} applies to quantized layers (4-bit or GGUF blocks), and the "
                         "model has none")
    refusals = [layer.base.requantize_refusal() for _, layer in four] if requantize else []
    if any(refusals):
        raise ValueError(f"merge_and_unload(requantize=True): {next(r for r in refusals if r)}")
    if safe_merge:
        for layer in dense:
            if not layer.merge_is_finite(names):
                raise ValueError(f"merging {names} would produce NaN or inf weights; the model was left unchanged")
        for _, layer in four:
            base = layer.base
            out = base.dtype if requantize or dtype is None else dtype
            if not bool(torch.isfinite(layer.merged_aside(names, base.dense(torch.float32)).to(out)).all()):
                raise ValueError(f"merging {names} would produce NaN or inf weights; the model was left unchanged")
    for layer in dense:
        layer.merge(names)
    tally = _Tally()
    for name, layer in four:
        base = layer.base
        layer.replace_base(base.dequantized(torch.float32))
        layer.merge(names)
        merged = layer.base_layer
        if requantize:
            layer.replace_base(base.requantized(merged.weight, merged.bias))
            tally.add(name, merged.weight, layer.base.dense(torch.float32))
        else:
            merged.to(dtype or base.dtype)
    model = owner._unload(keep=names)
    if requantize:
        report = tally.report()
        model.__dict__[REPORT_ATTR] = report
        log.info("merge_and_unload: %s", report.line())
        return model
    for name, module in list(model.named_modules()):  # the quantized layers no adapter touched
        base = quantized(module)
        if base is not None and name:
            model.set_submodule(name, base.dequantized(dtype or base.dtype))
    return model
