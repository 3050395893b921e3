"""`lorakit train`: fine-tune from a YAML recipe, with `key=value` and `--flag value` overrides.

    lorakit train recipe.yaml lr=2e-4 --max-steps 100

The flags are made from `lorakit.train.TrainConfig`'s fields; the trainer owns all meaning.
"""

from __future__ import annotations

import argparse
from typing import Any

from lorakit.commands.flags import add_dataclass_flags, given_flags

HELP = "fine-tune a model with LoRA from a YAML config (key=value and --flag overrides)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [CONFIG.yaml] [key=value ...] [--option VALUE ...]"
    parser.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml|key=value",
        help="a YAML config file (optional, first), then overrides such as lr=2e-4 "
             "target_modules=[q_proj,v_proj]; the options below may be given either way",
    )
    from lorakit.train.config import LORA_KEYS, LoraOptions, TrainConfig

    add_dataclass_flags(parser, TrainConfig, exclude=set(LORA_KEYS),
                        title="training options (override the config file)")
    add_dataclass_flags(parser, LoraOptions, title="LoRA options (LoraConfig's fields, PEFT's names)")


def run(args: argparse.Namespace) -> int:
    from lorakit.models.inference import quiet_loading
    from lorakit.train import load_train_config, train

    config_path, overrides = split_items(args.items)
    config = load_train_config(config_path, overrides, **given_flags(args))
    with quiet_loading():
        result = train(config)
    if result.rank == 0:  # under torchrun every process returns; one summary
        print(summary(result))
    return 0


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, key=value overrides); a config path may only come first."""
    config_path = None
    if items and "=" not in items[0]:
        config_path, items = items[0], items[1:]
    stray = [item for item in items if "=" not in item]
    if stray:
        raise ValueError(f"expected key=value, got {stray[0]!r} (the config file, if any, comes first)")
    return config_path, list(items)


def summary(result: Any) -> str:
    """Where the run's outputs are and how it went, plus the command to try the adapter."""
    lines = []
    if result.adapter_dir is not None:
        lines.append(f"adapter: {result.adapter_dir}")
    if result.model_dir is not None:
        lines.append(f"model: {result.model_dir}")
    losses = f"final loss {result.train_loss:.4f}" if result.train_loss is not None else "no loss logged"
    if result.eval_loss is not None:
        losses += f", eval loss {result.eval_loss:.4f}"
    lines.append(f"{result.steps} steps, {losses}, {result.tokens_per_s:,.0f} tokens/s, "
                 f"{result.train_time_s:.0f} s training ({result.wall_time_s:.0f} s in all)")
    lines.append(f"metrics: {result.metrics_path}" + (f", plot: {result.plot_path}" if result.plot_path else ""))
    if result.adapter_dir is not None:
        lines.append(f"try it: lorakit generate --adapter {result.adapter_dir} --prompt '...'")
    return "\n".join(lines)
