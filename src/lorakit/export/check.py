"""Pre-flight checks: the rules serving engines and loaders enforce on a LoRA adapter, before production.

Rules are pure functions over an `Adapter` (its config, the modules it adapts with their ranks, and
any other tensors it carries), so they run the same on a saved adapter directory (`read_adapter`)
and on one a recipe is about to train (`planned_adapter`). Each target is one `TARGETS` entry: a
tuple of rules. docs/check.md gives the source (repository + file, or doc page) of every rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lora.config import CONFIG_NAME, LoraConfig
from ..lora.io import PREFIX


# -- what the rules see -------------------------------------------------------------------------
@dataclass(frozen=True)
class Module:
    """One adapted module, named relative to the base model (`model.layers.0.self_attn.q_proj`)."""

    name: str
    rank: int
    embedding: bool = False  # lora_embedding_A/B (an nn.Embedding), not lora_A/B
    magnitude: bool = False  # carries a DoRA magnitude vector
    lora_bias: bool = False  # carries lora_B.bias

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Adapter:
    """An adapter as a loader sees it: saved (from its files) or planned (from a recipe and the base)."""

    config: LoraConfig
    raw: dict[str, Any]  # adapter_config.json as written (or as it would be written)
    modules: tuple[Module, ...]
    other: tuple[str, ...] = ()  # file keys that are no LoRA tensor: full weights, biases, foreign keys
    model_type: str | None = None  # the base's `config.model_type`, when it could be told
    tied_embeddings: bool | None = None
    problems: tuple[str, ...] = ()  # file-level inconsistencies found while reading (unpaired A/B, ...)


@dataclass(frozen=True)
class Finding:
    target: str
    rule: str  # what the loader requires
    culprit: str  # the offending key or value
    fix: str
    error: bool = True  # False: it loads, but slower or with a caveat

    def line(self) -> str:
        kind = "" if self.error else "warning: "
        return f"{self.target}: {kind}{self.rule}: {self.culprit}; fix: {self.fix}"


@dataclass(frozen=True)
class Options:
    max_lora_rank: int | None = None  # vLLM: the --max-lora-rank the server runs with (None: its default)


# A rule yields (rule, culprit, fix) or (rule, culprit, fix, error) tuples; the target's name is added.
Rule = Callable[[Adapter, Options], Iterable[tuple]]

MERGE = "merge it into the base (lorakit merge) and serve the merged model"
FOLD = ("export it with lorakit export --format gguf (it folds each module's true scale into lora_B), "
        "or merge it into the base (lorakit merge)")


# -- rules shared by several targets ------------------------------------------------------------
def file_consistent(adapter: Adapter, options: Options) -> Iterable[tuple]:
    """Every loader needs lora_A/lora_B in pairs whose ranks agree with the config (PEFT: size mismatch)."""
    for problem in adapter.problems:
        yield "lora_A and lora_B come in pairs of one rank", problem, "re-save the adapter"
    for m in adapter.modules:
        want = adapter.config.rank_for(m.name)
        if m.rank != want:
            yield ("each module's rank is the config's r (or its rank_pattern entry)",
                   f"{m.name} has rank {m.rank}, the config says {want}", "re-save the adapter with a matching config")


def no_dora(adapter: Adapter, options: Options) -> Iterable[tuple]:
    if adapter.config.use_dora or any(m.magnitude for m in adapter.modules):
        yield "no DoRA", "use_dora: true", f"{MERGE}, or train with use_dora: false"


def no_modules_to_save(adapter: Adapter, options: Options) -> Iterable[tuple]:
    if adapter.config.modules_to_save:
        yield ("modules_to_save must be empty", f"modules_to_save: {adapter.config.modules_to_save}",
               f"{MERGE}, or train without modules_to_save")


def bias_none(adapter: Adapter, options: Options) -> Iterable[tuple]:
    if adapter.config.bias != "none":
        yield 'bias must be "none"', f"bias: {adapter.config.bias}", f"{MERGE}, or train with bias: none"
    if adapter.config.lora_bias or any(m.lora_bias for m in adapter.modules):
        yield "no lora_B bias", "lora_bias: true", f"{MERGE}, or train with lora_bias: false"


def only_lora_tensors(adapter: Adapter, options: Options) -> Iterable[tuple]:
    """The file holds only lora_A/lora_B (and embedding A/B) tensors: no base weights, no biases."""
    from ..lora.targeting import is_saved_module

    config = adapter.config  # keys its own rule reports (modules_to_save, bias) are left to that rule
    other = [k for k in adapter.other if not (k.startswith(PREFIX) and (
        is_saved_module(config, k[len(PREFIX):].rsplit(".", 1)[0])
        or (config.bias != "none" and k.endswith(".bias"))))]
    if other:
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        yield ("no base weights inside the adapter", f"{other[0]}{more}",
               f"{MERGE}, or train without modules_to_save and with bias: none")


def one_scale(adapter: Adapter, options: Options) -> Iterable[tuple]:
    """vLLM and LoRAX scale every module by the config's lora_alpha / r (or / sqrt(r))."""
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(adapter.config, key)
        if pattern:
            name, value = next(iter(pattern.items()))
            yield (f"one scale for every module ({key} is not read)", f"{key}: {{{name}: {value}}}", FOLD)


def scale_alpha_over_rank(adapter: Adapter, options: Options) -> Iterable[tuple]:
    """llama.cpp scales each tensor by lora_alpha / its rank: rank_pattern works, rsLoRA and alpha_pattern do not."""
    if adapter.config.use_rslora:
        yield "scale is lora_alpha / rank (no rsLoRA)", "use_rslora: true", FOLD
    if adapter.config.alpha_pattern:
        name, value = next(iter(adapter.config.alpha_pattern.items()))
        yield "one lora_alpha for every module", f"alpha_pattern: {{{name}: {value}}}", FOLD


def _supported_targets(target: str, table: dict[str, frozenset[str]], adapter: Adapter,
                       fix: str) -> Iterable[tuple]:
    """Adapted modules must be ones the engine's model class for the base architecture knows."""
    if adapter.model_type is None:
        yield (f"targets must be modules {target}'s model class supports",
               "the base model's architecture is unknown", "pass --model-type (e.g. llama) or --base DIR", False)
        return
    supported = table.get(adapter.model_type)
    if supported is None:
        yield (f"targets must be modules {target}'s model class supports", f"model_type {adapter.model_type!r} "
               f"is not in lorakit's table ({', '.join(sorted(table))})", f"check {target}'s model list", False)
        return
    if not supported:
        yield (f"the base architecture must be one {target} serves LoRA on", f"model_type {adapter.model_type!r}",
               MERGE)
        return
    bad = sorted({m.short for m in adapter.modules} - supported)
    if bad:
        yield (f"targets must be modules {target}'s {adapter.model_type} class supports "
               f"({', '.join(sorted(supported)) or 'none'})", f"target_modules: {bad}", fix)


# -- vLLM ---------------------------------------------------------------------------------------
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_DEFAULT_MAX_LORA_RANK = 16
_SEVEN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_EMBED = frozenset({"embed_tokens", "lm_head"})
# every linear layer of vLLM's model class (q/k/v packed as qkv_proj, gate/up as gate_up_proj)
# plus its `embedding_modules`; a model class without SupportsLoRA has none
VLLM_TARGETS: dict[str, frozenset[str]] = {
    "llama": _SEVEN | _EMBED, "mistral": _SEVEN | _EMBED, "qwen2": _SEVEN, "qwen3": _SEVEN,
    "gemma": _SEVEN, "gemma2": _SEVEN, "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "gpt2": frozenset(),
}


def vllm_rank(adapter: Adapter, options: Options) -> Iterable[tuple]:
    rank = max([adapter.config.r, *(m.rank for m in adapter.modules)])
    if options.max_lora_rank is not None and options.max_lora_rank not in VLLM_MAX_LORA_RANKS:
        yield ("--max-lora-rank is one of " + ", ".join(map(str, VLLM_MAX_LORA_RANKS)),
               f"--max-lora-rank {options.max_lora_rank}", f"serve with --max-lora-rank {_rank_flag(rank)}")
        return
    limit = options.max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    if rank <= limit:
        return
    flag = _rank_flag(rank)
    where = "--max-lora-rank" if options.max_lora_rank else f"--max-lora-rank (default {limit})"
    yield (f"rank within {where}", f"rank {rank}",
           f"serve with --max-lora-rank {flag}" if flag else f"{MERGE} (vLLM's largest rank is 512)")


def _rank_flag(rank: int) -> int | None:
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def vllm_targets(adapter: Adapter, options: Options) -> Iterable[tuple]:
    return _supported_targets("vLLM", VLLM_TARGETS, adapter, f"train without those modules, or {MERGE}")


# -- LoRAX --------------------------------------------------------------------------------------
# ADAPTER_LAYERS of server/lorax_server/models/flash_<arch>.py; other layers are dropped with a warning
LORAX_TARGETS: dict[str, frozenset[str]] = {
    "llama": _SEVEN | {"lm_head"}, "mistral": _SEVEN | {"lm_head"}, "qwen2": _SEVEN | {"lm_head"},
    "mixtral": frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}), "gemma": _SEVEN, "gemma2": _SEVEN,
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc"}),
}
LORAX_GRAPH_RANKS = (8, 16, 32, 64)  # docs/guides/cuda_graphs.md: other ranks run eagerly


def lorax_targets(adapter: Adapter, options: Options) -> Iterable[tuple]:
    return _supported_targets("LoRAX", LORAX_TARGETS, adapter,
                              f"train without those modules (LoRAX drops them), or {MERGE}")


def lorax_ranks(adapter: Adapter, options: Options) -> Iterable[tuple]:
    ranks = sorted({m.rank for m in adapter.modules} | {adapter.config.r})
    odd = [r for r in ranks if r not in LORAX_GRAPH_RANKS]
    if odd:
        yield ("ranks 8, 16, 32 or 64 for CUDA graphs (others decode eagerly, slower)", f"rank {odd[0]}",
               "train with r: 8, 16, 32 or 64", False)


# -- llama.cpp and Ollama -----------------------------------------------------------------------
def llamacpp_tied_head(adapter: Adapter, options: Options) -> Iterable[tuple]:
    if adapter.tied_embeddings and any(m.short == "lm_head" for m in adapter.modules):
        yield ("no lm_head adapter on a base with tied embeddings", "lm_head",
               f"train without lm_head, or {MERGE}")


# the base architectures Ollama converts safetensors adapters for (convert/convert.go ConvertAdapter:
# GGUF architecture llama or gemma2; Mistral and Mixtral bases are llama there)
OLLAMA_ARCHITECTURES = frozenset({"llama", "mistral", "mixtral", "gemma2"})
OLLAMA_GGUF = "convert it with llama.cpp's convert_lora_to_gguf.py and use ADAPTER file.gguf"


def ollama_architecture(adapter: Adapter, options: Options) -> Iterable[tuple]:
    if adapter.model_type is None:
        yield ("safetensors adapters only on Llama/Mistral/Gemma 2 bases", "the base model's architecture is unknown",
               "pass --model-type (e.g. llama) or --base DIR", False)
    elif adapter.model_type not in OLLAMA_ARCHITECTURES:
        yield ("safetensors adapters only on Llama/Mistral/Gemma 2 bases", f"model_type {adapter.model_type!r}",
               OLLAMA_GGUF)


def ollama_targets(adapter: Adapter, options: Options) -> Iterable[tuple]:
    bad = sorted({m.short for m in adapter.modules} - _SEVEN)
    if bad:
        yield ("the converter maps only q/k/v/o/gate/up/down_proj", f"target_modules: {bad}",
               f"{OLLAMA_GGUF}, or train on the seven projections only")


def ollama_integer_alpha(adapter: Adapter, options: Options) -> Iterable[tuple]:
    """Ollama reads lora_alpha into a uint32: 32.0 or 16.5 in the JSON fails to unmarshal."""
    alpha = adapter.raw.get("lora_alpha")
    if not (isinstance(alpha, int) and not isinstance(alpha, bool)):
        fix = (f"write \"lora_alpha\": {int(alpha)} in {CONFIG_NAME}" if isinstance(alpha, float) and alpha.is_integer()
               else f"train with an integer lora_alpha, or {OLLAMA_GGUF}")
        yield "lora_alpha is an integer in the JSON", f"lora_alpha: {alpha!r}", fix


# -- PEFT ---------------------------------------------------------------------------------------
_LORACONFIG_KEYS = frozenset(LoraConfig.__dataclass_fields__)


def peft_known_keys(adapter: Adapter, options: Options) -> Iterable[tuple]:
    from ..lora.config import _IGNORED_KEYS

    unknown = sorted(set(adapter.raw) - _LORACONFIG_KEYS - _IGNORED_KEYS)
    if unknown:
        yield ("config keys are LoraConfig fields (PEFT drops others with a warning)", f"{unknown}",
               f"remove them from {CONFIG_NAME} if they matter", False)


def peft_targets_match(adapter: Adapter, options: Options) -> Iterable[tuple]:
    """PEFT only creates layers its target_modules match; weights of other modules are never loaded."""
    from ..lora.targeting import ALL_LINEAR, name_is_target

    targets = adapter.config.target_modules
    if targets is None or targets == ALL_LINEAR or targets == {ALL_LINEAR}:
        return  # resolved against the model at load time
    stray = [m.name for m in adapter.modules if not name_is_target(adapter.config, m.name)]
    if stray:
        yield ("every module in the file is matched by target_modules", stray[0],
               "add it to target_modules (or exclude it from the file)")


# -- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    rules: tuple[Rule, ...]
    help: str = ""


TARGETS: dict[str, Target] = {
    "vllm": Target((file_consistent, no_modules_to_save, no_dora, bias_none, vllm_rank, one_scale, vllm_targets,
                    only_lora_tensors), "vLLM --enable-lora"),
    "lorax": Target((file_consistent, no_modules_to_save, no_dora, bias_none, one_scale, lorax_targets, lorax_ranks),
                    "LoRAX"),
    "llama.cpp": Target((file_consistent, no_dora, no_modules_to_save, bias_none, only_lora_tensors,
                         scale_alpha_over_rank, llamacpp_tied_head), "convert_lora_to_gguf.py + llama.cpp"),
    "ollama": Target((file_consistent, ollama_architecture, no_dora, no_modules_to_save, bias_none,
                      only_lora_tensors, ollama_targets, scale_alpha_over_rank, ollama_integer_alpha),
                     "Ollama Modelfile ADAPTER (safetensors)"),
    "peft": Target((file_consistent, peft_known_keys, peft_targets_match), "peft.PeftModel.from_pretrained"),
}
TARGET_NAMES = tuple(TARGETS)


def check_targets(names: str | Sequence[str] | None) -> list[str]:
    """Validated target names (None or 'all': every target)."""
    if names is None or names == "all" or list(names) == ["all"]:
        return list(TARGETS)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in TARGETS:
            raise ValueError(f"unknown serve target {name!r}; targets: {', '.join(TARGETS)}")
    return list(dict.fromkeys(names))


def check_adapter(adapter: Adapter, targets: str | Sequence[str] | None = None,
                  options: Options = Options()) -> list[Finding]:
    """Every finding of the named targets' rules (all targets by default), in table order."""
    findings = []
    for name in check_targets(targets):
        for rule in TARGETS[name].rules:
            for found in rule(adapter, options):
                findings.append(Finding(name, *found))
    return findings


# -- reading a saved adapter --------------------------------------------------------------------
_LORA_SUFFIXES = {  # file key suffix -> what it is
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "EA", ".lora_embedding_B": "EB",
    ".lora_magnitude_vector": "M", ".lora_magnitude_vector.weight": "M", ".lora_B.bias": "bias",
}


def read_adapter(path: str | os.PathLike, model_type: str | None = None, base: str | None = None) -> Adapter:
    """An adapter directory as the rules see it: config, tensor names and shapes (headers only).

    The base architecture comes from `model_type`, else `base`'s config.json, else the config's
    base_model_name_or_path when that is a local model dir (or a built-in model already converted).
    """
    from .inspect import tensor_table
    from ..models.inference import check_adapter_dir

    directory = Path(path)
    check_adapter_dir(directory)
    config = LoraConfig.from_pretrained(directory)
    raw = json.loads((directory / CONFIG_NAME).read_text())
    shapes = {k: shape for k, (shape, _) in tensor_table(directory).items()}
    modules, other, problems = modules_from_keys(shapes)
    base_config = _base_config(base or config.base_model_name_or_path)
    return Adapter(config, raw, modules, other,
                   model_type=model_type or base_config.get("model_type"),
                   tied_embeddings=base_config.get("tie_word_embeddings"), problems=problems)


def modules_from_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[tuple[Module, ...], tuple[str, ...], tuple[str, ...]]:
    """(adapted modules, other keys, pairing problems) from PEFT-layout file keys and their shapes."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    other = []
    for key, shape in shapes.items():
        kind = next((k for s, k in _LORA_SUFFIXES.items() if key.endswith(s)), None)
        if kind is None or not key.startswith(PREFIX):
            other.append(key)
            continue
        suffix = next(s for s in _LORA_SUFFIXES if key.endswith(s))
        parts.setdefault(key[len(PREFIX):-len(suffix)], {})[kind] = shape
    modules, problems = [], []
    for name, found in parts.items():
        embedding = "EA" in found or "EB" in found
        a, b = (found.get("EA"), found.get("EB")) if embedding else (found.get("A"), found.get("B"))
        if a is None or b is None:
            problems.append(f"{name} has {'lora_B' if a is None else 'lora_A'} without its pair")
            continue
        rank_a, rank_b = a[0], b[-1]  # A: (r, in) or (r, num_embeddings); B: (out, r)
        if rank_a != rank_b:
            problems.append(f"{name}: lora_A has rank {rank_a}, lora_B {rank_b}")
        modules.append(Module(name, rank_a, embedding, "M" in found, "bias" in found))
    return tuple(modules), tuple(sorted(other)), tuple(problems)


def _base_config(base: str | None) -> dict[str, Any]:
    """The base model's config.json as a dict, when it can be read locally ({} otherwise)."""
    if not base:
        return {}
    candidates = [Path(base).expanduser()]
    from ..models.embedded import BUILTIN_MODELS

    if base.lower() in BUILTIN_MODELS:  # converted once, on first use
        from ..models.cache import cache_dir

        candidates.append(cache_dir() / "models" / base.lower())
    for directory in candidates:
        file = directory / "config.json"
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except ValueError:
                return {}
    return {}


# -- a planned adapter (training has not started) -----------------------------------------------
def planned_adapter(model: Any, config: LoraConfig) -> Adapter:
    """The adapter `get_peft_model(model, config)` would save, from the base model alone.

    Module names come from the same targeting code the engine uses, ranks from the config, and
    the full tensors it would carry (modules_to_save copies, trained biases) from their names.
    """
    from torch import nn

    from ..lora.targeting import find_targets, saved_module_names

    named = dict(model.named_modules())
    modules = []
    for name in find_targets(model, config):
        embedding = isinstance(named[name], nn.Embedding)
        modules.append(Module(name, config.rank_for(name), embedding,
                              magnitude=config.use_dora and not embedding, lora_bias=config.lora_bias))
    other = [f"{PREFIX}{name}.weight" for name in saved_module_names(model, config)]
    adapted = {m.name for m in modules}
    if config.bias != "none":
        other += [f"{PREFIX}{n}" for n, _ in model.named_parameters() if n.endswith(".bias")
                  and (config.bias == "all" or n.rsplit(".", 1)[0] in adapted)]
    model_config = getattr(model, "config", None)
    return Adapter(config, json.loads(json.dumps(config.to_dict())), tuple(modules), tuple(sorted(other)),
                   model_type=getattr(model_config, "model_type", None),
                   tied_embeddings=getattr(model_config, "tie_word_embeddings", None))


__all__ = ["Adapter", "Finding", "Module", "Options", "TARGETS", "TARGET_NAMES", "check_adapter",
           "check_targets", "modules_from_keys", "planned_adapter", "read_adapter"]
