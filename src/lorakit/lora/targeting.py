"""Which modules of a model get adapters: PEFT's name-matching rules, written once."""

from __future__ import annotations

import re

from torch import nn

from .. import bases
from ..arch import DEFAULT_TARGETS
from .config import LoraConfig
from .layers import Linear as LoraLinear
from .layers import LoraLayer, ModulesToSaveWrapper

ALL_LINEAR = "all-linear"


def _matches(spec: set[str] | str, name: str) -> bool:
    """A regex string must match the whole name; a list entry matches the name or a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{key}") for key in spec)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(config: LoraConfig, name: str) -> bool:
    if config.layers_to_transform is None:
        return True
    index = _layer_index(name, config.layers_pattern)
    if index is None:
        return False
    wanted = config.layers_to_transform
    return index == wanted if isinstance(wanted, int) else index in wanted


def name_is_target(config: LoraConfig, name: str) -> bool:
    """Does `config` (with explicit target_modules) target module `name`? The name-only part of find_targets."""
    targets, exclude = config.target_modules, config.exclude_modules
    return (targets is not None and _matches(targets, name) and _in_layers(config, name)
            and not (exclude and _matches(exclude, name)) and not is_saved_module(config, name))


def is_saved_module(config: LoraConfig, name: str) -> bool:
    """Is module `name` one that `modules_to_save` names, or inside one? (PEFT's rule: an entry
    matches the whole name or its dotted suffix, as a list of target_modules does.)"""
    if not config.modules_to_save:
        return False
    spec = set(config.modules_to_save)
    parts = name.split(".")
    return any(_matches(spec, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def saved_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The outermost modules `modules_to_save` names, in model order."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and not any(name.startswith(o + ".") for o in found) and is_saved_module(config, name):
            found.append(name)
    return found


def resolve_targets(model: nn.Module, config: LoraConfig) -> set[str] | str:
    """The effective `target_modules`: expands None (per model type) and "all-linear"."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules is not set and there is no default for model type {model_type!r}; "
                "pass target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')"
            )
        return set(DEFAULT_TARGETS[model_type])
    if targets == ALL_LINEAR or targets == {ALL_LINEAR}:
        head = _output_layer_names(model)
        names = {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name not in head
            and not _inside_lora_internals(name)
            and (isinstance(module, LoraLinear) or bases.is_linear(module))
        }
        # keep the head out even if it shares a suffix with a body layer
        return names - {h.rsplit(".", 1)[-1] for h in head} or names
    return targets


def _output_layer_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"}


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules an adapter with `config` goes on, in model order.

    Raises ValueError listing the model's adaptable layer names when nothing matches, and
    TypeError when a matched module is of a type LoRA cannot wrap.
    """
    targets = resolve_targets(model, config)
    exclude = config.exclude_modules
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSaveWrapper) or _inside_lora_internals(name):
            continue
        if exclude and _matches(exclude, name):
            continue
        if is_saved_module(config, name):
            continue
        if not _matches(targets, name) or not _in_layers(config, name):
            continue
        if not isinstance(module, LoraLayer):
            bases.check_adaptable(name, module)
        found.append(name)
    if not found:
        raise ValueError(
            f"target_modules {_show(config.target_modules)} matched no module of the model; "
            f"its adaptable layers are: {', '.join(adaptable_names(model)) or 'none'}"
        )
    return found


_LORA_INTERNALS = re.compile(r"(^|\.)(base_layer|lora_A|lora_B|lora_dropout|original_module|modules_to_save)(\.|$)")


def _inside_lora_internals(name: str) -> bool:
    return _LORA_INTERNALS.search(name) is not None


def adaptable_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of layers LoRA can wrap, e.g. ['q_proj', 'k_proj', …]."""
    names = [
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (bases.is_adaptable(module) or isinstance(module, LoraLayer)) and not _inside_lora_internals(name)
    ]
    return list(dict.fromkeys(names))


def _show(targets: set[str] | str | None) -> str:
    return repr(sorted(targets)) if isinstance(targets, set) else repr(targets)
