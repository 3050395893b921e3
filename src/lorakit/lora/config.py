"""LoraConfig: the adapter's hyper-parameters, validated, with PEFT-compatible JSON in and out.

Field names, defaults and meanings follow PEFT's `LoraConfig` so that an `adapter_config.json`
written by either library loads in the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Union

CONFIG_NAME = "adapter_config.json"

Targets = Union[list[str], set[str], str, None]

# Keys PEFT writes that carry no meaning for plain LoRA at these values, or are metadata.
_IGNORED_KEYS = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size"}


def _doc(default: Any, help: str) -> Any:
    """A field whose help (`metadata["help"]`) is its documentation, for recipes and `--help` too."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoftQConfig:
    """PEFT's LoftQConfig: `loftq_bits` (4: NF4) and `loftq_iter`, the alternations T (>= 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        checked_loftq_config(vars(self))


def checked_loftq_config(value: Any) -> dict[str, int]:
    """A LoftQConfig's dict as a LoraConfig keeps it, defaults filled in; ValueError naming what is wrong."""
    if not isinstance(value, dict):
        raise ValueError(f"loftq_config: must be a LoftQConfig or a dict, got {type(value).__name__}")
    unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ValueError(f"loftq_config: unknown key {unknown[0]!r} (known: loftq_bits, loftq_iter)")
    bits, iters = value.get("loftq_bits", 4), value.get("loftq_iter", 1)
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(f"loftq_config.loftq_bits: lorakit's LoftQ quantizes to 4 bits, got {bits!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"loftq_config.loftq_iter: must be an integer >= 1, got {iters!r}")
    return {"loftq_bits": bits, "loftq_iter": iters}


@dataclass
class LoraConfig:
    """Which modules get a LoRA adapter and how it is shaped, initialised and scaled."""

    r: int = _doc(8, "rank of the update B @ A")
    lora_alpha: float = _doc(8, "the update is scaled by lora_alpha / r")
    target_modules: Targets = _doc(None, "modules that get adapters: names (matching the end of the dotted "
                                   "name), 'all-linear', or a regex string; null: PEFT's choice for the model type")
    exclude_modules: Targets = _doc(None, "modules never adapted: names or a regex string")
    lora_dropout: float = _doc(0.0, "dropout on the LoRA input during training")
    fan_in_fan_out: bool = _doc(False, "the base stores its weight as (in, out), as GPT-2's Conv1D does")
    bias: Literal["none", "all", "lora_only"] = _doc("none", "which base biases train (and are saved with "
                                                     "the adapter): none, all, or those of adapted modules")
    use_rslora: bool = _doc(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    modules_to_save: list[str] | None = _doc(None, "modules trained in full and saved beside the adapter")
    init_lora_weights: bool | Literal["gaussian", "loftq"] = _doc(
        True, "B starts at 0 (no change at first) with A Kaiming-uniform (true) or of std 1/r (gaussian); "
              "loftq: base + adapter start near the 16/32-bit weights (a 4-bit base, see loftq_config); "
              "false: A and B both random (tests)")
    loftq_config: dict[str, int] = _doc({}, "with init_lora_weights: loftq, {loftq_bits: 4, loftq_iter: T}: "
                                        "T alternations of quantizing and a rank-r SVD (T > 1 rewrites the base)")
    layers_to_transform: list[int] | int | None = _doc(None, "adapt only these layer indices")
    layers_pattern: list[str] | str | None = _doc(None, "the module list holding the layers (e.g. layers); "
                                                  "with layers_to_transform")
    rank_pattern: dict[str, int] = _doc({}, "per-module rank, {name or regex: r}, overriding r")
    alpha_pattern: dict[str, float] = _doc({}, "per-module alpha, {name or regex: alpha}, overriding lora_alpha")
    use_dora: bool = _doc(False, "DoRA: learn a magnitude vector besides the low-rank direction")
    lora_bias: bool = _doc(False, "give lora_B a trainable bias")
    task_type: str | None = _doc(None, "PEFT's task type, e.g. CAUSAL_LM (metadata)")
    peft_type: str = _doc("LORA", "always LORA for a LoraConfig")
    base_model_name_or_path: str | None = _doc(None, "the base model the adapter was trained on (metadata)")
    revision: str | None = _doc(None, "the base model's hub revision (metadata)")
    inference_mode: bool = _doc(False, "loaded for inference only: the adapter does not train")

    def __post_init__(self) -> None:
        # Copy containers so that later changes to the caller's lists never reach us.
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, (list, tuple)):
            self.layers_to_transform = list(self.layers_to_transform)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = vars(self.loftq_config)
        self.loftq_config = dict(self.loftq_config) if isinstance(self.loftq_config, dict) else self.loftq_config or {}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, "field: what is wrong", for the first field whose value is invalid."""
        _positive("r", self.r, integer=True)
        _positive("lora_alpha", self.lora_alpha)
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias: must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian", "loftq"):
            raise ValueError(
                f"init_lora_weights: must be True, False, 'gaussian' or 'loftq', got {self.init_lora_weights!r}"
            )
        if self.init_lora_weights == "loftq":
            self.loftq_config = checked_loftq_config(self.loftq_config)
        elif self.loftq_config:  # as PEFT: ignored, with a warning
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'", stacklevel=3)
            self.loftq_config = {}
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type: must be 'LORA' for a LoraConfig, got {self.peft_type!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias: not supported together with use_dora")
        for key, value in self.rank_pattern.items():
            _positive(f"rank_pattern[{key!r}]", value, integer=True)
        for key, value in self.alpha_pattern.items():
            _positive(f"alpha_pattern[{key!r}]", value)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern: only used together with layers_to_transform")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("layers_to_transform: cannot be used when target_modules is a regex string")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, set)):
                raise ValueError(f"{name}: must be a list of names or a regex string, got {type(value).__name__}")

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], set):
                out[name] = sorted(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from a dict; keys we do not know (newer PEFT/lorakit fields) warn and are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(
            k for k in data if k not in known and k not in _IGNORED_KEYS and data[k] not in (None, {}, [], False)
        )
        if unknown:
            warnings.warn(
                f"adapter config keys not understood by lorakit were ignored: {', '.join(unknown)}",
                stacklevel=2,
            )
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter is of peft_type {data['peft_type']!r}; lorakit loads LORA adapters only")
        return cls(**{k: v for k, v in data.items() if k in known})

    def as_trained(self) -> "LoraConfig":
        """This config for an adapter whose weights exist (saved, or read from a file): a LoftQ start
        becomes init_lora_weights true, since the start is behind it (PEFT would run LoftQ again, on
        CUDA, to load a file that says "loftq"; lorakit would rewrite the base for nothing)."""
        if self.init_lora_weights != "loftq":
            return self
        return dataclasses.replace(self, init_lora_weights=True, loftq_config={})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write adapter_config.json, describing the trained adapter (`as_trained`)."""
        from .io import atomic_write_bytes

        text = json.dumps(self.as_trained().to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(directory, CONFIG_NAME), text.encode())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    # -- per-module values -------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)


def _positive(name: str, value: Any, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: must be {kind}, got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies when it matches the end of the module's dotted name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
