"""TrainConfig: every training option in one dataclass, loaded from YAML plus `key=value` overrides.

The YAML a user writes, the `key=value` overrides, the CLI flags and the `config.yaml` a run
writes all use these field names. Each field's `metadata["help"]` is its documentation (the CLI
builds `--help` from it), so there is one source for what an option means. The LoRA options are
`LoraConfig`'s own fields under PEFT's names (see `LoraOptions`), validated by `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.lora.config import LoraConfig

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A training option that is unknown or has a bad value; the message names it."""


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# LoraConfig fields a recipe does not set, and why: the trainer or the file format fills them in.
NOT_IN_RECIPE = {
    "task_type": "the trainer fine-tunes causal LMs: always CAUSAL_LM",
    "peft_type": "always LORA",
    "base_model_name_or_path": "recorded from `model`",
    "revision": "a hub revision is part of `model`'s resolution, not the adapter's",
    "inference_mode": "an adapter being trained is never in inference mode",
}
# Where a recipe's default differs from LoraConfig's (PEFT's): a rank and targets that fine-tune well.
RECIPE_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32.0, "target_modules": SEVEN_PROJECTIONS}


def _lora_options() -> type:
    """A dataclass of LoraConfig's fields (less NOT_IN_RECIPE) with the recipe's defaults and their help."""
    hints = typing.get_type_hints(LoraConfig)
    fields = []
    for f in dataclasses.fields(LoraConfig):
        if f.name not in NOT_IN_RECIPE:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields.append((f.name, hints[f.name], _opt(RECIPE_DEFAULTS.get(f.name, default), f.metadata["help"])))
    doc = "LoraConfig's fields as recipe options (built from it, so a new LoraConfig field is one too)."
    return dataclasses.make_dataclass("LoraOptions", fields, namespace={"__module__": __name__, "__doc__": doc})


LoraOptions = _lora_options()
LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoraOptions))


@dataclass
class TrainConfig(LoraOptions):
    """What to fine-tune, on which data, how, and where the run goes (see each field's help).

    The LoRA options (`LORA_KEYS`: r, lora_alpha, target_modules, ...) come from `LoraOptions`.
    """

    # -- model and data ---------------------------------------------------------------------
    model: str = _opt("smollm2-135m", "base model: a built-in name, a local model dir, a .gguf file or a hub id")
    data: str | None = _opt(None, "training records (JSONL, JSON, CSV, Parquet or a datasets dir); required")
    eval_data: str | None = _opt(None, "held-out records for eval loss (default: none, or see eval_fraction)")
    eval_fraction: float = _opt(0.0, "hold out this fraction of the training records for eval loss")
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = _opt(
        "auto", "record format; auto detects it per record")
    train_on_prompt: bool = _opt(False, "also train on prompt/user tokens, not only on the answers")
    max_seq_len: int = _opt(512, "cut examples to this many tokens (packed rows hold this many)")
    packing: bool = _opt(False, "pack several examples per row (no attention across them) to skip padding")
    # -- method -----------------------------------------------------------------------------
    method: Literal["lora", "full"] = _opt("lora", "lora trains an adapter (options in LoraConfig's "
                                           "names: r, lora_alpha, ...); full trains every weight")
    gguf_base: Literal["auto", "packed", "dense"] = _opt(
        "auto", "for a .gguf or built-in model: packed trains on the file's own quantized blocks (the "
        "frozen base de-quantized inside each product: a Q4 model's weights in about a sixth of fp32's "
        "memory), dense on its cached fp32/dtype conversion; auto = packed where the file's architecture "
        "allows it (llama, qwen2) and quantize is none, else dense (docs/gguf.md)")
    # -- a 4-bit base (QLoRA) -------------------------------------------------------------
    quantize: Literal["nf4", "fp4", "none"] = _opt(
        "none", "store the base's linear layers in 4 bits while training (QLoRA): nf4 or fp4, none keeps "
        "them in dtype; the output head and embeddings stay in dtype, the adapter in fp32")
    double_quant: bool = _opt(True, "with quantize: also quantize each 4-bit block's scale to 8 bits "
                              "(QLoRA's double quantization, ~0.4 bit a weight less)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "with quantize: the dtype the 4-bit layers' products run in; auto = the model's dtype")
    # -- optimisation -----------------------------------------------------------------------
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (never applied to biases and norms)")
    scheduler: Literal["cosine", "linear", "constant"] = _opt("cosine", "learning-rate decay after warmup")
    warmup_steps: int = _opt(0, "linear warmup from 0 over this many optimizer steps")
    warmup_ratio: float = _opt(0.0, "warmup as a fraction of all steps (instead of warmup_steps)")
    batch_size: int = _opt(8, "examples (or packed rows) per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step; step batch = batch_size * grad_accum")
    max_grad_norm: float | None = _opt(1.0, "clip the gradient norm to this (null: no clipping)")
    epochs: int = _opt(1, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (overrides epochs)")
    seed: int = _opt(42, "seed for adapter init, shuffling, the eval split and dropout")
    # -- run --------------------------------------------------------------------------------
    eval_every: int | None = _opt(None, "eval loss every N steps (and at the end) when there is eval data")
    save_every: int | None = _opt(None, "checkpoint every N steps under output_dir/checkpoints/")
    keep_checkpoints: int = _opt(2, "keep only the newest K checkpoints")
    log_every: int = _opt(1, "log (metrics.jsonl, progress) every N steps")
    output_dir: str = _opt("output", "run directory: adapter/, metrics.jsonl, loss.png, config.yaml")
    overwrite: bool = _opt(False, "replace a previous run's files in a non-empty output_dir")
    resume: str | None = _opt(None, "continue from a checkpoint: 'latest' (in output_dir) or its path")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "base weights' dtype (adapters stay fp32); auto is bfloat16 on GPUs that support it, else float32")
    frozen_matmul_precision: Literal["highest", "high", "medium"] = _opt(
        "highest", "precision of the frozen base weights' products in LoRA training (torch's names): "
        "highest is exact fp32; medium takes bf16 operands on CPUs with AMX and TF32 on NVIDIA GPUs "
        "(faster, ~1e-3 relative error in those products); attention and the adapters stay exact")
    quiet: bool = _opt(False, "plain log lines instead of a progress bar")
    report_to: list[str] | str = _opt("none", "also log to tensorboard (output_dir/tensorboard) and/or wandb "
                                      "(offline unless WANDB_MODE is set); a list allowed; none: metrics.jsonl only")
    serve_target: list[str] | str | None = _opt(None, "check at start that the adapter will load in these "
                                                "(vllm, lorax, llama.cpp, ollama, peft; see lorakit check); "
                                                "a failed rule stops the run before training")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = _opt(
        "auto", "under torchrun: ddp all-reduces the adapter's gradients, fsdp also shards the base "
        "across processes; auto = ddp when several processes run; one process ignores it")
    dist_timeout: float = _opt(600.0, "seconds a rank waits for the others in a collective before the "
                               "run stops with an error (a rank that died or hangs)")

    def __post_init__(self) -> None:
        # copy the caller's containers so that later changes to them never reach this config
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, dict, set)):
                setattr(self, f.name, type(value)(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is wrong."""
        hints = _hints()
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if not self.data:
            raise ConfigError("data: required (the path of the training records)")
        _at_least("max_seq_len", self.max_seq_len, 2)
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints"):
            _at_least(name, getattr(self, name), 1)
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _in_range("eval_fraction", self.eval_fraction, 0, 1)
        _in_range("warmup_ratio", self.warmup_ratio, 0, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm: must be positive or null, got {self.max_grad_norm!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("warmup_steps and warmup_ratio are both set; set one of them")
        if self.eval_data and self.eval_fraction:
            raise ConfigError("eval_data and eval_fraction are both set; set one of them")
        if self.eval_every is not None and not (self.eval_data or self.eval_fraction):
            raise ConfigError("eval_every: there is no eval data; set eval_data or eval_fraction too")
        if isinstance(self.target_modules, list) and not all(self.target_modules):
            raise ConfigError(f"target_modules: empty name in {self.target_modules!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules: must name at least one module (null: the model type's default)")
        self.lora_config()
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ConfigError(f"dist_timeout: must be a positive number of seconds, got {self.dist_timeout!r}")
        if self.resume is not None and not self.resume:
            raise ConfigError("resume: expected 'latest' or a checkpoint path, got ''")
        if self.method == "full" and self.frozen_matmul_precision != "highest":
            raise ConfigError("frozen_matmul_precision: method full has no frozen weights; leave it at highest")
        _check_reporting(self)
        self._check_quantization()
        self._check_gguf_base()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")

    def reporters(self) -> list[str]:
        """report_to as a list of names, without 'none'."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [n for n in names if n != "none"]

    def serve_targets(self) -> list[str]:
        return [] if self.serve_target is None else (
            [self.serve_target] if isinstance(self.serve_target, str) else list(self.serve_target))

    def _check_gguf_base(self) -> None:
        if self.gguf_base != "packed":
            return
        from lorakit.models.load import is_gguf_model

        if not is_gguf_model(self.model):
            raise ConfigError(f"gguf_base: packed reads a .gguf file or a built-in model, not {self.model!r}; "
                              "leave gguf_base at auto")
        if self.quantize != "none":
            raise ConfigError(f"gguf_base: packed keeps the file's own quantized blocks; quantize {self.quantize} "
                              "applies to the dense conversion (gguf_base: dense)")
        if self.method == "full":
            raise ConfigError("gguf_base: packed is a frozen base, and method full trains every weight; "
                              "use gguf_base: dense")

    def packed_base(self) -> bool:
        """Whether the run trains on the GGUF file's blocks (`gguf_base`, resolved for `model`)."""
        if self.quantize != "none" or self.method == "full":
            return False
        from lorakit.models.load import packs_gguf

        try:
            return packs_gguf(self.model, self.gguf_base)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"gguf_base: {err}") from None

    def loftq_rounds(self) -> int:
        """The LoftQ start's iterations (`loftq_config`'s loftq_iter, defaults filled in); 0: none."""
        if self.method != "lora" or self.init_lora_weights != "loftq":
            return 0
        return self.lora_config().loftq_config["loftq_iter"]

    def rewrites_base(self) -> bool:
        """Whether the run's LoftQ start changes the 4-bit base's codes (more than one iteration), so
        that the adapter needs that base, saved beside it."""
        return self.loftq_rounds() > 1

    def _check_quantization(self) -> None:
        if self.quantize == "none":
            if self.loftq_rounds():
                raise ConfigError("init_lora_weights: loftq starts the adapter against a 4-bit base; "
                                  "set quantize: nf4 (or fp4) too")
            for name, unset in (("double_quant", True), ("compute_dtype", "auto")):
                if getattr(self, name) != unset:
                    raise ConfigError(f"{name}: applies to a 4-bit base only; set quantize: nf4 (or fp4) too")
            return
        if self.method == "full":
            raise ConfigError(f"quantize: method full trains every weight, and a {self.quantize} base is frozen; "
                              "use method: lora")

    def quant_config(self) -> Any:
        """The QuantConfig the base is loaded with (None: quantize is none)."""
        if self.quantize == "none":
            return None
        from lorakit.bases.quant_config import QuantConfig

        compute = None if self.compute_dtype == "auto" else self.compute_dtype
        return QuantConfig(quant_type=self.quantize, double_quant=self.double_quant, compute_dtype=compute)

    def lora_config(self, **metadata: Any) -> LoraConfig:
        """The LoraConfig this recipe trains; `metadata` sets NOT_IN_RECIPE fields. Its errors are ConfigErrors."""
        try:
            return LoraConfig(**{name: getattr(self, name) for name in LORA_KEYS}, **metadata)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading ----------------------------------------------------------------------------------
def load_train_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = (), **flags: Any
) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `key=value` overrides, then `flags` (None = unset).

    Override values are read as YAML scalars or lists (`lr=2e-4`, `target_modules=[q_proj,v_proj]`).
    Unknown keys and bad values raise ConfigError naming the key.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        _check_key(key, f"override {item!r}")
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot read value {text!r} ({getattr(err, 'problem', err)})") from None
    for key, value in flags.items():
        _check_key(key, "option")
        if value is not None:
            values[key] = value
    hints = _hints()
    coerced = {key: coerce(key, value, hints[key]) for key, value in values.items()}
    return TrainConfig(**coerced)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got a {type(values).__name__}")
    for key in values:
        _check_key(str(key), str(path))
    return values


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


# Names the same options have in TRL / transformers / PEFT, for the "did you mean" hint only.
_KNOWN_AS = {
    "learning_rate": "lr", "lr_scheduler_type": "scheduler", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_length": "max_seq_len", "max_seq_length": "max_seq_len", "lora_r": "r", "rank": "r",
    "alpha": "lora_alpha", "dropout": "lora_dropout", "dataset": "data", "train_data": "data",
    "model_name_or_path": "model", "resume_from_checkpoint": "resume", "save_steps": "save_every",
    "tf32": "frozen_matmul_precision", "matmul_precision": "frozen_matmul_precision",
    "eval_steps": "eval_every", "logging_steps": "log_every", "overwrite_output_dir": "overwrite",
    "save_total_limit": "keep_checkpoints", "save_dir": "output_dir", "out_dir": "output_dir",
}


def _check_key(key: str, where: str) -> None:
    names = field_names()
    if key in names:
        return
    close = [_KNOWN_AS[key]] if key in _KNOWN_AS else difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{where}: unknown option {key!r}; {hint}valid options: {', '.join(names)}")


# -- types ------------------------------------------------------------------------------------
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


_NAME_LIST = re.compile(r"[\w.\-]+(\s*,\s*[\w.\-]+)+")


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type where the reading is unambiguous ("2e-4" -> 2e-4, 3.0 -> 3).

    PyYAML reads `2e-4` as a string (YAML 1.1 wants a dot), and a comma list from the command
    line arrives as one string; both are fixed here. Anything else is left for the type check.
    """
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    lists = [o for o in options if typing.get_origin(o) is list]
    if isinstance(value, str) and _NAME_LIST.fullmatch(value) and lists:
        (item,) = typing.get_args(lists[0])
        return [coerce(name, part.strip(), item) for part in value.split(",")]
    if value is None or any(_fits(value, o) for o in options):
        return value
    for option in options:
        if option is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option is int and not isinstance(value, bool):
            number = value
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    continue
            if isinstance(number, float) and number.is_integer():
                return int(number)
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _fits(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if typing.get_origin(hint) in (list, set):
        (item,) = typing.get_args(hint)
        return isinstance(value, typing.get_origin(hint)) and all(_fits(v, item) for v in value)
    if typing.get_origin(hint) is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_describe(o) for o in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (list, set):
        return "a list of " + {str: "names", int: "integers"}.get(typing.get_args(hint)[0], "values")
    if typing.get_origin(hint) is dict:
        return f"a mapping of name: {_describe(typing.get_args(hint)[1])}"
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_type(name: str, value: Any, hint: Any) -> None:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if not any(_fits(value, o) for o in options):
        raise ConfigError(f"{name}: expected {_describe(hint)}, got {value!r}")


def _check_reporting(config: TrainConfig) -> None:
    """report_to names and their packages (found, not imported), serve_target names."""
    import importlib.util

    from lorakit.train.reporting import REPORTERS

    for name in config.reporters():
        if name not in REPORTERS:
            raise ConfigError(f"report_to: unknown {name!r}; expected {', '.join(REPORTERS)} or none")
        if importlib.util.find_spec(REPORTERS[name].package) is None:
            raise ConfigError(f"report_to: {name} needs the {REPORTERS[name].package} package: "
                              f"pip install 'lorakit[{name}]'")
    if config.serve_target is not None:
        from lorakit.export.check import check_targets

        if config.method != "lora":
            raise ConfigError("serve_target: checks a LoRA adapter; method full trains none")
        try:
            check_targets(config.serve_targets())
        except ValueError as err:
            raise ConfigError(f"serve_target: {err}") from None


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}: must be at least {low}, got {value}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ConfigError(f"{name}: must be in [{low}, {high}), got {value}")
