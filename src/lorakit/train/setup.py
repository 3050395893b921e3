"""Everything a run needs before its first step: data, the model to train, the optimizer, where to resume."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from lorakit.data import DataError, Example, load_records, pack, split_records, tokenize_records

from .checkpoint import latest_checkpoint
from .config import LORA_KEYS, ConfigError, TrainConfig

# Options that shape the trajectory: a resumed run must have the checkpoint's values for these.
# (batch_size and grad_accum may change, with the number of processes, if the global batch stays.)
TRAJECTORY = (
    "model", "data", "eval_fraction", "format", "train_on_prompt", "max_seq_len", "packing", "method",
    "quantize", "double_quant", "compute_dtype", *LORA_KEYS, "lr", "weight_decay", "scheduler", "warmup_steps", "warmup_ratio", "max_grad_norm", "seed",
)


LOFTQ_BASE = "base"  # under output_dir: the base a LoftQ start rewrote (TrainConfig.rewrites_base)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# -- data -------------------------------------------------------------------------------------
@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, int]


def read_records(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), before any model is loaded, so a bad file fails fast."""
    records = load_records(config.data, config.format)
    if config.eval_data:
        return records, load_records(config.eval_data, config.format)
    return split_records(records, config.eval_fraction, seed=config.seed)


def tokenize(config: TrainConfig, tokenizer: Any, train: list[dict], held_out: list[dict]) -> Datasets:
    """Token ids with loss labels (packed when asked), and the counts the run reports."""
    args = dict(max_seq_len=config.max_seq_len, train_on_prompt=config.train_on_prompt, fmt=config.format)
    data = tokenize_records(train, tokenizer, **args)
    stats = {"train_records": data.n_records, "train_examples": len(data.examples),
             "truncated": data.n_truncated, "dropped": data.n_dropped,
             "train_tokens": data.n_tokens, "train_target_tokens": data.n_trainable}
    eval_examples: list[Example] = []
    if held_out:
        try:
            evald = tokenize_records(held_out, tokenizer, **args)
        except DataError as err:
            raise DataError(f"eval data: {err}") from None
        eval_examples = evald.examples
        stats.update(eval_examples=len(evald.examples), eval_truncated=evald.n_truncated,
                     eval_dropped=evald.n_dropped)
    train_examples = data.examples
    if config.packing:
        train_examples = pack(train_examples, config.max_seq_len)
        eval_examples = pack(eval_examples, config.max_seq_len) if eval_examples else []
        stats["train_rows"] = len(train_examples)
    return Datasets(train_examples, eval_examples, stats)


# -- model ------------------------------------------------------------------------------------
def prepare_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """LoRA: wrap with a fresh fp32 adapter (base frozen). Full: every weight trains."""
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.method == "lora":
        from lorakit import get_peft_model

        lora = config.lora_config(task_type="CAUSAL_LM", base_model_name_or_path=adapter_base(config))
        check_serving(model, lora, config.serve_targets())
        model = get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.train()


def check_serving(model: nn.Module, lora: Any, targets: list[str]) -> None:
    """serve_target: refuse, before training, an adapter those engines would not load; warn on the rest."""
    if not targets:
        return
    import warnings

    from lorakit.export.check import check_adapter, planned_adapter

    findings = check_adapter(planned_adapter(model, lora), targets)
    for finding in findings:
        if not finding.error:
            warnings.warn(finding.line(), stacklevel=2)
    failed = [f.line() for f in findings if f.error]
    if failed:
        raise ConfigError(f"serve_target: the adapter would fail {len(failed)} rule(s): " + " | ".join(failed))


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant: works with a frozen base and LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")


def adapter_base(config: TrainConfig) -> str:
    """The base adapter_config.json names: the run's own saved base when LoftQ rewrote it."""
    if config.rewrites_base():
        return str((Path(config.output_dir) / LOFTQ_BASE).expanduser().resolve())
    return base_model_name(config.model)


def save_rewritten_base(model: nn.Module, config: TrainConfig, tokenizer: Any) -> None:
    """Write the 4-bit base a LoftQ start rewrote to output_dir/base (a transformers + bitsandbytes
    4-bit directory), the base the adapter was trained against; nothing for other runs."""
    if not config.rewrites_base():
        return
    from lorakit.models.quantized import save_quantized

    with model.base_model.base_only() as base:
        save_quantized(base, adapter_base(config), tokenizer)


def base_model_name(model: str) -> str:
    """What adapter_config.json records as the base: a local path made absolute, names as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in optimizer order: matrices (decayed) first, then biases and norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if p.ndim >= 2] + [(n, p) for n, p in named if p.ndim < 2]


def build_optimizer(
    params: list[tuple[str, nn.Parameter]], config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the lr is set every step from the schedule."""
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    fused = device.type == "cuda" and all(p.is_floating_point() for _, p in params)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; a 4-bit or GGUF layer's weight counts as its elements (it is buffers)."""
    from lorakit.bases.registry import uncounted_weight_elements

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) + uncounted_weight_elements(model)


# -- resuming ---------------------------------------------------------------------------------
def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: `latest` in output_dir, a run dir's latest, or a checkpoint dir."""
    if config.resume is None:
        return None
    if config.resume == "latest":
        root = Path(config.output_dir) / "checkpoints"
        found = latest_checkpoint(root)
        if found is None:
            raise FileNotFoundError(
                f"resume=latest: no checkpoint in {root} (save_every sets how often one is written)")
        return found
    path = Path(config.resume).expanduser()
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"resume={config.resume}: no checkpoint in {path / 'checkpoints'}")
        return found
    if not path.is_dir():
        raise FileNotFoundError(f"resume: checkpoint not found: {path}")
    return path


def check_resumable(config: TrainConfig, checkpoint: Path, world_size: int = 1) -> int:
    """Refuse to continue a run with options that would change its trajectory; return the number
    of processes that wrote the checkpoint.

    Another number of processes continues the run exactly when the global batch (batch_size x
    grad_accum x processes) is the same: every step then reads the same examples.
    """
    file = checkpoint / "config.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint (no config.yaml)")
    saved = yaml.safe_load(file.read_text()) or {}
    for name in TRAJECTORY:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"resume: {checkpoint} was trained with {name}={saved[name]!r}, but this config has "
                f"{name}={getattr(config, name)!r}; they must match to continue the run"
            )
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    saved_world = int(state.get("world_size", 1))
    before = (saved.get("batch_size", config.batch_size), saved.get("grad_accum", config.grad_accum), saved_world)
    now = (config.batch_size, config.grad_accum, world_size)
    if math.prod(before) != math.prod(now):
        fits = math.prod(before) % (config.grad_accum * world_size) == 0
        hint = (f"set batch_size={math.prod(before) // (config.grad_accum * world_size)} to continue it with "
                f"{_processes(world_size)}" if fits else f"run it with {_processes(saved_world)} and "
                f"batch_size={before[0]}, grad_accum={before[1]}")
        raise ConfigError(
            f"resume: {checkpoint} was trained with a global batch of {math.prod(before)} ({_global(*before)}), "
            f"but this run's is {math.prod(now)} ({_global(*now)}); every step must read the same "
            f"examples to continue the run: {hint}"
        )
    return saved_world


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def _global(batch_size: int, grad_accum: int, world_size: int) -> str:
    return f"batch_size {batch_size} x grad_accum {grad_accum} x {_processes(world_size)}"
