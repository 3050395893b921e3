"""`estimate(...)`: parameters, training memory and adapter size of a fine-tuning run, from a config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from ..arch import FUSED_BLOCK_TYPES
from . import memory as M
from .activations import ADAPTER_BYTES, Activations, activation_bytes
from .loss import engine_chunk, fused_loss_bytes, plain_loss_bytes
from .params import ModelFacts, ParamCount, model_facts, safetensors_file_bytes
from .presets import check_fields, load_config_dict

GiB = 1024**3
# Memory of common cards as the driver reports it (an "80 GB" card has 80 GiB).
GPUS: tuple[tuple[str, int], ...] = (("24 GB", 24 * GiB), ("40 GB", 40 * GiB), ("48 GB", 48 * GiB), ("80 GB", 80 * GiB))
OPTIMIZERS = tuple(M.OPTIMIZER_STATES)
MASTER_WEIGHTS = ("fp32", "none")
DEVICES = ("gpu", "cpu")  # cpu: products as lorakit runs them on this machine's CPU (bases.compute)
# Architectures whose decoder layer the activation formula describes exactly.
LLAMA_STYLE = ("llama", "mistral", "qwen2")

ModelSpec = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass(frozen=True)
class Memory:
    """Bytes per component; `total` is the step's peak (see memory.peak_bytes), not their sum."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits_loss: int
    total: int


@dataclass(frozen=True)
class GpuFit:
    gpu: str
    capacity_bytes: int
    fits: bool
    used_percent: float


@dataclass(frozen=True)
class Estimate:
    """Everything `lorakit estimate` prints; `to_dict`/`from_dict` round-trip through JSON."""

    model: str
    model_type: str
    method: str
    rank: int | None
    alpha: float | None
    adapted_modules: tuple[str, ...]
    batch_size: int
    seq_len: int
    dtype: str
    optimizer: str
    master_weights: str
    gradient_checkpointing: bool
    params: ParamCount
    memory: Memory
    adapter_file_bytes: int | None
    fits: tuple[GpuFit, ...]
    assumptions: str

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["params"]["trainable_percent"] = round(self.params.trainable_percent, 4)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Estimate":
        data = dict(data)
        params = {k: v for k, v in data["params"].items() if k != "trainable_percent"}
        data["params"] = ParamCount(**params)
        data["memory"] = Memory(**data["memory"])
        data["fits"] = tuple(GpuFit(**fit) for fit in data["fits"])
        data["adapted_modules"] = tuple(data["adapted_modules"])
        return cls(**data)


def estimate(
    model: ModelSpec,
    method: str = "lora",
    *,
    rank: int = 16,
    alpha: float = 32,
    targets: str | Sequence[str] | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    master_weights: str = "fp32",
    gradient_checkpointing: bool = False,
    double_quant: bool = True,
    compute_dtype: str | None = None,
    device: str = "gpu",
) -> Estimate:
    """Size a fine-tuning run of `model` (preset name, config.json, model directory or config dict).

    Parameter counts are exact (meta-device model + lorakit's target matching); memory follows
    the pure functions in `activations`, `loss` and `memory` beside this module. `targets=None`
    uses the engine's default for the architecture; "all-linear" or a list/comma string of layer
    names otherwise. Bad values raise ValueError naming the CLI flag (`--seq-len`, …).

    QLoRA (`method="qlora"`) sizes lorakit's own 4-bit base (`bases.linear4bit`, NF4 or FP4 alike):
    `double_quant` as QuantConfig's; `compute_dtype` (None: `dtype`) is the products' dtype,
    which on a `device="cpu"` without 16-bit matrix instructions is fp32 (`bases.compute`).
    """
    _check_choices(method, dtype, optimizer, master_weights)
    if compute_dtype is not None and compute_dtype not in M.DTYPE_BYTES:
        raise ValueError(f"--compute-dtype must be one of {', '.join(M.DTYPE_BYTES)}, got {compute_dtype!r}")
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    label, config = _config(model)
    lora = None
    if method != "full":
        _check_positive(rank=rank, alpha=alpha)
        lora = {"r": rank, "lora_alpha": alpha, "target_modules": _targets(targets)}
    try:
        facts = model_facts(config, method, lora)
    except ValueError as err:
        raise ValueError(f"--targets: {err}" if "target_modules" in str(err) else str(err)) from None
    product = _product_dtype(compute_dtype or dtype, device)
    mem = _memory(facts, method, batch_size, seq_len, M.DTYPE_BYTES[dtype], optimizer,
                  master_weights == "fp32", gradient_checkpointing, double_quant, M.DTYPE_BYTES[product])
    return Estimate(
        model=label,
        model_type=facts.model_type,
        method=method,
        rank=rank if lora else None,
        alpha=float(alpha) if lora else None,
        adapted_modules=tuple(facts.adapted),
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        master_weights=master_weights,
        gradient_checkpointing=gradient_checkpointing,
        params=facts.params,
        memory=mem,
        adapter_file_bytes=safetensors_file_bytes(facts.adapter_tensors) if lora else None,
        fits=tuple(_fit(name, capacity, mem.total) for name, capacity in GPUS),
        assumptions=_assumptions(facts.model_type, method, dtype, optimizer, master_weights, gradient_checkpointing,
                                 facts.fused_loss, double_quant, product),
    )


def _memory(
    facts: ModelFacts, method: str, batch: int, seq: int, b: int, optimizer: str, master: bool, checkpointing: bool,
    double_quant: bool = True, product_bytes: int | None = None,
) -> Memory:
    adapter = facts.params.total - facts.base_params
    trainable = facts.params.trainable
    full = method == "full"
    param_bytes = b if full else ADAPTER_BYTES
    qlora = method == "qlora"
    weights = M.weight_bytes(facts.base_params, adapter, b, facts.body_linears if qlora else (), double_quant)
    gradients = M.gradient_bytes(trainable, param_bytes)
    optimizer_states = M.optimizer_bytes(trainable, optimizer, param_bytes, master)
    activations = activation_bytes(facts.shape, batch, seq, b, None if full else facts.adapted, checkpointing,
                                   fused_blocks=not full and facts.model_type in FUSED_BLOCK_TYPES)
    if qlora:  # one 4-bit weight at a time is de-quantized for its product, beside a layer's backward
        transient = M.dequantized_bytes(facts.largest_linear, b, product_bytes or b)
        activations = Activations(activations.kept, activations.recompute, activations.working + transient)
    if facts.fused_loss:
        loss = fused_loss_bytes(facts.shape, batch, seq, b, head_trains=full)
    else:
        loss = plain_loss_bytes(facts.shape, batch, seq)
    head_gradient = facts.head_params * b if full else 0
    late_gradient = head_gradient if facts.tied_head else 0
    total = M.peak_bytes(weights, gradients, optimizer_states, activations, loss, head_gradient, late_gradient)
    return Memory(weights, gradients, optimizer_states, activations.most, loss, total)


def _fit(name: str, capacity: int, total: int) -> GpuFit:
    return GpuFit(name, capacity, total <= capacity, round(100 * total / capacity, 1))


def _product_dtype(dtype: str, device: str) -> str:
    """The dtype lorakit's products of a `dtype` weight run in on `device` (bases.compute)."""
    if device == "gpu":
        return dtype
    import torch

    from ..bases.compute import product_dtype

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    chosen = product_dtype(names[dtype], torch.device("cpu"))
    return next(name for name, value in names.items() if value == chosen)


def _assumptions(
    model_type: str, method: str, dtype: str, optimizer: str, master: str, checkpointing: bool, fused_loss: bool,
    double_quant: bool = True, product: str | None = None,
) -> str:
    """The one line that says what the memory figures assume."""
    scales = "8-bit scales per 64 + fp32 per 256" if double_quant else "fp32 scales per 64"
    weights = {
        "full": f"{dtype} weights",
        "lora": f"{dtype} base + fp32 adapters",
        "qlora": f"4-bit base as lorakit stores it (codes + {scales}; embeddings, norms and head in {dtype}), "
                 f"one layer de-quantized at a time for its {product or dtype} product + fp32 adapters",
    }
    master_copy = method == "full" and master == "fp32" and dtype != "fp32"
    state_dtype = dtype if method == "full" and not master_copy else "fp32"
    states = {"adamw": f"AdamW 2 states in {state_dtype}", "adamw8bit": "8-bit AdamW (2 bytes/param)",
              "sgd": "SGD without momentum (no states)"}[optimizer]
    if master_copy:
        states += " + fp32 master weights"
    parts = [
        weights[method],
        states + ", fused step",
        "SDPA attention, no padding mask",
        "per-layer gradient checkpointing" if checkpointing else "no gradient checkpointing",
        f"lorakit's chunked loss (logits {engine_chunk()} tokens at a time)" if fused_loss
        else "whole fp32 logits for the loss",
        "one micro-batch per step",
        "total = peak = weights + optimizer + max(activations + loss, gradients)",
        "CUDA context and allocator slack not included",
    ]
    if model_type not in LLAMA_STYLE:
        parts.append(f"activations use the Llama-style formula, approximate for {model_type!r}")
    return "; ".join(parts)


def _config(model: ModelSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(model, Mapping):
        config = dict(model)
        check_fields(config, "config")
        return str(config.get("_name_or_path") or config["model_type"]), config
    return load_config_dict(os.fspath(model))


def _targets(targets: str | Sequence[str] | None) -> str | list[str] | None:
    if targets is None or targets == "all-linear":
        return targets
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--targets is empty; give layer names (q_proj,v_proj) or all-linear")
    return names


def _check_choices(method: str, dtype: str, optimizer: str, master_weights: str) -> None:
    for flag, value, allowed in (
        ("--method", method, ("full", "lora", "qlora")),
        ("--dtype", dtype, tuple(M.DTYPE_BYTES)),
        ("--optimizer", optimizer, OPTIMIZERS),
        ("--master-weights", master_weights, MASTER_WEIGHTS),
    ):
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{flag} must be a positive number, got {value!r}")
        if name in ("batch_size", "seq_len", "rank") and not isinstance(value, int):
            raise ValueError(f"{flag} must be a whole number, got {value!r}")
