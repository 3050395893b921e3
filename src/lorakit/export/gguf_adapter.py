"""llama.cpp's LoRA adapter GGUF, both ways: writing a PEFT-layout adapter as one, and reading one back.

What llama.cpp's loader (src/llama-adapter.cpp) takes: `general.type` "adapter", `adapter.type`
"lora", `general.architecture` equal to the base model's, `adapter.lora.alpha` (float32), and for
every adapted base tensor (named as in the base GGUF, e.g. ``blk.3.attn_q.weight``) a pair
``<name>.lora_a`` / ``<name>.lora_b``. In torch's order (GGUF lists `ne` reversed) lora_a is PEFT's
A (r, in) and lora_b PEFT's B (out, r); for ``token_embd.weight`` lora_a is A transposed
(vocab, r). Each pair is scaled by alpha / (its rank), or by 1 when alpha is 0.

A PEFT adapter's own scale per module (rsLoRA's alpha / sqrt(r), `rank_pattern`, `alpha_pattern`)
is folded into lora_b so that llama.cpp's one alpha gives the same product. Llama-family GGUF files
store attn_q / attn_k rows permuted for llama.cpp's rotary layout, so lora_b of those is permuted
the same way (and un-permuted on reading). The architecture table, the name map and the
permutation are `models.gguf_names`'s, shared with the packed loader and the merged-model writer.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..lora.config import LoraConfig
from ..lora.functional import lora_scaling
from ..lora.io import PREFIX, atomic_write_bytes, fsync_dir
from ..models.gguf_names import GGUF_ARCHS, arch_for_model_type, gguf_names, permute_rows, rotary_heads, unpermute_rows
from ..models.gguf_header import open_gguf, read_header
from . import check
from .check import Module

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # general.file_type: gguf.LlamaFileType's numbers
LORA_A, LORA_B = ".lora_a", ".lora_b"
EMBEDDING = "token_embd.weight"
MERGED_EXPORT = "export the merged model instead: lorakit merge --adapter DIR --output model.gguf"


# -- the math -----------------------------------------------------------------------------------
def llamacpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp gives one lora_a/lora_b pair: alpha / rank (lora_b's ne[0]), or 1 when alpha is 0."""
    return alpha / rank if alpha else 1.0


# -- the base: what the adapter's tensors are named and shaped after ----------------------------
@dataclass(frozen=True)
class GGUFBase:
    """The base model as a GGUF adapter refers to it. Head counts carry transformers' names so that
    `rotary_heads` reads them as it reads a config."""

    arch: str  # general.architecture
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tensors: dict[str, tuple[int, ...]]  # GGUF tensor name -> shape in torch's order
    source: str  # what it was read from, for messages and a Modelfile's FROM
    gguf_file: Path | None = None

    @property
    def rope_permuted(self) -> bool:
        return GGUF_ARCHS[self.arch].rope_permuted

    def names(self, module_names: list[str]) -> dict[str, str]:
        """module name -> its GGUF weight's name (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``)."""
        found = gguf_names([f"{m}.weight" for m in module_names], GGUF_ARCHS[self.arch].member,
                           self.num_hidden_layers)
        return {name[: -len(".weight")]: gguf_name for name, gguf_name in found.items()}

    def heads(self, gguf_name: str) -> int | None:
        """The heads a tensor's rows are permuted by in this GGUF (None: not permuted)."""
        return rotary_heads(self, gguf_name) if self.rope_permuted else None


def gguf_arch_of(model_type: str | None, where: str) -> str:
    """The `general.architecture` an adapter for a `model_type` base names; a one-line error otherwise."""
    try:
        return arch_for_model_type(model_type).name
    except ValueError:
        known = ", ".join(sorted(t for a in GGUF_ARCHS.values() for t in (a.model_type, *a.aliases)))
        raise ValueError(f"{where}: model_type {model_type!r} has no GGUF adapter name map in lorakit "
                         f"(it maps {known}); {MERGED_EXPORT}") from None


def base_from_config(config: Any, source: str) -> GGUFBase:
    """A transformers base (its config) as GGUF names it: shapes from the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    arch = gguf_arch_of(getattr(config, "model_type", None), f"{source} (config.json)")
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    transposed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}  # GGUF: (out, in)
    params = {name: tuple(p.shape)[::-1] if name in transposed else tuple(p.shape)
              for name, p in model.named_parameters()}
    n_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    base = GGUFBase(arch, n_layers, heads, getattr(config, "num_key_value_heads", None) or heads, {}, source)
    modules = [name[: -len(".weight")] for name in params if name.endswith(".weight")]
    tensors = {gguf_name: params[f"{module}.weight"] for module, gguf_name in base.names(modules).items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("output.weight", None)  # llama.cpp reads the head from token_embd
    return GGUFBase(base.arch, n_layers, heads, base.num_key_value_heads, tensors, source)


def base_from_gguf(path: Path) -> GGUFBase:
    """A base GGUF model file, from its metadata and tensor table (nothing is de-quantized)."""
    header = read_header(path)
    kind = header.field("general.type") or "model"
    if kind != "model":
        raise ValueError(f"{path}: general.type is {kind!r}; the base must be a model GGUF")
    arch = header.architecture
    if arch not in GGUF_ARCHS:
        known = ", ".join(sorted(GGUF_ARCHS))
        raise ValueError(f"{path}: general.architecture {arch!r} has no GGUF adapter name map in lorakit "
                         f"(it maps {known}); {MERGED_EXPORT}")
    n_head = header.field(f"{arch}.attention.head_count")
    return GGUFBase(arch, int(header.field(f"{arch}.block_count")), int(n_head),
                    int(header.field(f"{arch}.attention.head_count_kv") or n_head),
                    {t.name: t.shape for t in header.tensors.values()}, str(path), gguf_file=path)


def resolve_base(base: Any, recorded: str | None, adapter_dir: Path) -> GGUFBase:
    """`base` (a name, path, transformers config or model), else the adapter's recorded base."""
    from ..models.embedded import BUILTIN_MODELS, builtin_gguf_path
    from ..models.inference import model_is_available

    if base is None:
        if not recorded or not model_is_available(recorded):
            what = f"its base model {recorded!r} is not available here" if recorded else "it records no base model"
            raise ValueError(f"{adapter_dir}/adapter_config.json: base_model_name_or_path: {what}; "
                             "pass the base with --model (a model dir, .gguf file or built-in name)")
        base = recorded
    if hasattr(base, "config") and hasattr(base, "named_parameters"):  # a loaded model
        base = base.config
    if not isinstance(base, (str, os.PathLike)):
        return base_from_config(base, getattr(base, "name_or_path", None) or type(base).__name__)
    name = os.fspath(base)
    if name.lower() in BUILTIN_MODELS:
        return base_from_gguf(builtin_gguf_path(name.lower()))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"base model file not found: {path}")
        return base_from_gguf(path)
    from transformers import AutoConfig

    return base_from_config(AutoConfig.from_pretrained(name), name)


# -- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One adapted module as llama.cpp stores it: lora_a, lora_b (torch order) in float32."""

    gguf_name: str
    a: Tensor
    b: Tensor


def adapter_pairs(config: LoraConfig, tensors: dict[str, Tensor], modules: Sequence[Module], base: GGUFBase,
                  alpha: float, where: str) -> list[Pair]:
    """The adapter's lora_A/lora_B as llama.cpp's pairs: renamed, q/k rows permuted, each module's
    own scale folded into lora_b so that llama.cpp's `llamacpp_scale(alpha, rank)` gives it."""
    names = base.names([m.name for m in modules])
    pairs = []
    for module in modules:
        gguf_name = names.get(module.name)
        if gguf_name is None or gguf_name not in base.tensors:
            looked = f" (looked for {gguf_name})" if gguf_name else ""
            raise ValueError(f"{where}: module {module.name} has no tensor in the {base.arch} base "
                             f"{base.source}{looked}; {MERGED_EXPORT}")
        stem = PREFIX + module.name
        if module.embedding:
            a, b = tensors[f"{stem}.lora_embedding_A"].float(), tensors[f"{stem}.lora_embedding_B"].float()
            shapes_ok = gguf_name == EMBEDDING and base.tensors[gguf_name] == (a.shape[1], b.shape[0])
        else:
            a, b = tensors[f"{stem}.lora_A.weight"].float(), tensors[f"{stem}.lora_B.weight"].float()
            shapes_ok = base.tensors[gguf_name] == (b.shape[0], a.shape[1])
        if not shapes_ok:
            raise ValueError(f"{where}: module {module.name} is {tuple(b.shape)} @ {tuple(a.shape)}, which does "
                             f"not fit {gguf_name} {base.tensors[gguf_name]} of the base {base.source}")
        rank = a.shape[0]
        own = lora_scaling(config.alpha_for(module.name), rank, config.use_rslora)
        b = b * (own / llamacpp_scale(alpha, rank))
        heads = base.heads(gguf_name)
        if heads is not None:
            b = permute_rows(b, heads)
        pairs.append(Pair(gguf_name, a.T.contiguous() if module.embedding else a.contiguous(), b.contiguous()))
    return pairs


def encode(tensor: Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; q8_0 falls back to f16 for rows that are not
    whole 32-value blocks (a rank-16 lora_b), as llama.cpp's converter does."""
    import gguf

    values = tensor.detach().to(torch.float32).numpy()
    if outtype == "q8_0" and values.shape[-1] % 32 == 0:
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if outtype == "f32":
        return values, None
    return values.astype(np.float16), None


def _refuse_unrepresentable(config: LoraConfig, tensors: dict[str, Tensor], base: GGUFBase,
                            where: str) -> tuple[Module, ...]:
    """The adapted modules, after check.py's llama.cpp rules (all but the scale rule, which the export
    folds): DoRA, modules_to_save, trained biases, a head tied to the embeddings are refused."""
    modules, other, problems = check.modules_from_keys({k: tuple(v.shape) for k, v in tensors.items()})
    adapter = check.Adapter(config, config.to_dict(), modules, other,
                            tied_embeddings="output.weight" not in base.tensors, problems=problems)
    for rule in (check.file_consistent, check.no_dora, check.no_modules_to_save, check.bias_none,
                 check.only_lora_tensors, check.llamacpp_tied_head):
        for found in rule(adapter, check.Options()):
            what, culprit = found[0], found[1]
            if rule is check.file_consistent:
                raise ValueError(f"{where}: {culprit} ({what})")
            raise ValueError(f"{where}: {culprit}: a GGUF LoRA adapter has no form for it ({what}); {MERGED_EXPORT}")
    return modules


def export_gguf_adapter(adapter: str | os.PathLike, output: str | os.PathLike, *, base: Any = None,
                        outtype: str = "f32", overwrite: bool = False, modelfile: bool = False) -> Path:
    """Write the adapter directory `adapter` as llama.cpp's LoRA adapter GGUF at `output`.

    `base` is the base model (a built-in name, a .gguf file, a model dir or hub id, a transformers
    config or model; default: the adapter's recorded base). A GGUF base is the strictest: every
    tensor is checked against the file's own names and shapes, as llama.cpp will. The file is
    written beside `output` and renamed into place; an existing `output` is replaced only with
    `overwrite`. `modelfile` also writes an Ollama `Modelfile` (FROM the base, ADAPTER the file)
    beside it. Returns the output path.
    """
    import gguf

    from ..lora.io import load_adapter_weights
    from ..models.inference import check_adapter_dir

    directory, out = Path(adapter), Path(output).expanduser().absolute()
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    for path in [out] + ([out.parent / "Modelfile"] if modelfile else []):
        if path.is_dir():
            raise IsADirectoryError(f"output path {path} is a directory; give a file name")
        if path.exists() and not overwrite:
            raise FileExistsError(f"output file {path} exists; pass --overwrite to replace it")
    check_adapter_dir(directory)
    config = LoraConfig.from_pretrained(directory)
    tensors = load_adapter_weights(directory)
    gguf_base = resolve_base(base, config.base_model_name_or_path, directory)
    where = str(directory)
    modules = _refuse_unrepresentable(config, tensors, gguf_base, where)
    alpha = float(config.lora_alpha)
    pairs = adapter_pairs(config, tensors, modules, gguf_base, alpha, where)

    writer = gguf.GGUFWriter(None, gguf_base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_name(directory.absolute().name)
    if config.base_model_name_or_path:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, config.base_model_name_or_path)
    for pair in pairs:
        for suffix, value in ((LORA_A, pair.a), (LORA_B, pair.b)):
            data, raw_dtype = encode(value, outtype)
            writer.add_tensor(pair.gguf_name + suffix, data, raw_dtype=raw_dtype)
    _write_atomically(writer, out)
    if modelfile:
        write_adapter_modelfile(out, gguf_base)
    return out


def _write_atomically(writer: Any, out: Path) -> None:
    """The whole file beside `out`, fsynced, then renamed over it: readers never see half of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an adapter file is normally shared
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter_modelfile(adapter_file: Path, base: GGUFBase) -> Path:
    """An Ollama Modelfile beside `adapter_file`: FROM the base (its GGUF file where known), ADAPTER the file."""
    source = str(base.gguf_file.absolute()) if base.gguf_file else base.source
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().absolute())
    text = f"FROM {source}\nADAPTER ./{adapter_file.name}\n"
    path = adapter_file.parent / "Modelfile"
    atomic_write_bytes(path, text.encode())
    return path


# -- reading ------------------------------------------------------------------------------------
def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _values(tensor: Any) -> Tensor:
    """A reader tensor de-quantized to float32 in torch's shape."""
    from ..bases import gguf_blocks

    raw = torch.from_numpy(np.asarray(tensor.data).reshape(-1).view(np.uint8).copy())
    return gguf_blocks.dequantize(raw, tensor.tensor_type, _shape(tensor), tensor.name)


def adapter_fields(path: str | os.PathLike) -> tuple[Any, str, float]:
    """(reader, architecture, alpha) of a LoRA adapter GGUF; a ValueError naming the field that says otherwise."""
    reader = open_gguf(path)
    kind = _field(reader, "general.type")
    if kind != "adapter":
        raise ValueError(f"{path}: general.type is {kind!r}, not 'adapter': this GGUF is no LoRA adapter "
                         "(a model GGUF loads as the base: lorakit.load_model)")
    adapter_type = _field(reader, "adapter.type")
    if adapter_type != "lora":
        raise ValueError(f"{path}: adapter.type is {adapter_type!r}, not 'lora'")
    return reader, _field(reader, "general.architecture"), float(_field(reader, "adapter.lora.alpha") or 0.0)


def _pairs_in(reader: Any, path: Any) -> dict[str, dict[str, Any]]:
    """GGUF base tensor name -> {"a": tensor, "b": tensor}, as llama.cpp pairs them."""
    import warnings

    pairs: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        for suffix, part in ((LORA_A, "a"), (LORA_B, "b")):
            if tensor.name.endswith(suffix):
                pairs.setdefault(tensor.name[: -len(suffix)], {})[part] = tensor
                break
        else:
            if not tensor.name.endswith("_norm.weight"):
                raise ValueError(f"{path}: tensor {tensor.name} is neither .lora_a nor .lora_b")
            warnings.warn(f"{path}: {tensor.name} (a norm weight) is skipped, as llama.cpp skips it", stacklevel=3)
    for name, found in pairs.items():
        if len(found) != 2:
            raise ValueError(f"{path}: tensor {name}{LORA_B if 'a' in found else LORA_A} is missing "
                             f"(only {name}{LORA_A if 'a' in found else LORA_B} is there)")
    return pairs


def read_gguf_adapter(path: str | os.PathLike, model: torch.nn.Module) -> tuple[LoraConfig, dict[str, Tensor]]:
    """A GGUF LoRA adapter as (LoraConfig, PEFT-layout tensors) for `model` (a transformers model, with or
    without lorakit adapters): names mapped back, q/k rows un-permuted, llama.cpp's scale kept exact."""
    config = model.config
    arch = gguf_arch_of(getattr(config, "model_type", None), f"the model {type(model).__name__}")
    reader, file_arch, alpha = adapter_fields(path)
    if file_arch != arch:
        raise ValueError(f"{path}: general.architecture is {file_arch!r}, the model's is {arch!r}")
    heads = config.num_attention_heads
    base = GGUFBase(arch, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
                    {}, type(model).__name__)
    modules = [n for n, _ in model.named_modules() if n and "base_layer" not in n and ".lora_" not in n]
    back = {gguf_name: module for module, gguf_name in base.names(modules).items()}
    tensors, ranks = {}, {}
    for gguf_name, found in _pairs_in(reader, path).items():
        module = back.get(gguf_name)
        if module is None:
            raise ValueError(f"{path}: tensor {gguf_name}{LORA_A} names no module of the {arch} model")
        a, b = _values(found["a"]), _values(found["b"])
        heads_of = base.heads(gguf_name)
        b = b if heads_of is None else unpermute_rows(b, heads_of)
        if gguf_name == EMBEDDING:
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = a.T.contiguous()
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = b.shape[1]
    if not ranks:
        raise ValueError(f"{path}: holds no .lora_a/.lora_b tensors")
    return lora_config_for(ranks, alpha, getattr(config, "name_or_path", None) or None), tensors


def lora_config_for(ranks: dict[str, int], alpha: float, base_name: str | None) -> LoraConfig:
    """The LoraConfig whose scale for each module is llama.cpp's `llamacpp_scale(alpha, rank)`."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    exact = {re.escape(m): rank for m, rank in ranks.items() if rank != r}
    alphas = {} if alpha else {re.escape(m): float(rank) for m, rank in ranks.items() if rank != r}
    return LoraConfig(r=r, lora_alpha=alpha or float(r), target_modules=sorted(ranks), rank_pattern=exact,
                      alpha_pattern=alphas, base_model_name_or_path=base_name, task_type="CAUSAL_LM")


def inspect_gguf_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF LoRA adapter holds: architecture, ranks, alpha, the base tensors it adapts, types, size."""
    reader, arch, alpha = adapter_fields(path)
    pairs = _pairs_in(reader, path)
    ranks = {name: _shape(found["b"])[1] for name, found in pairs.items()}
    kinds = sorted({name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0] for name in pairs})
    blocks = sorted({int(name.split(".")[1]) for name in pairs if name.startswith("blk.")})
    file_type = _field(reader, "general.file_type")
    base_models = _field(reader, "general.base_model.0.name")
    return {
        "path": str(path), "format": "gguf", "architecture": arch, "base_model": base_models,
        "lora_alpha": alpha, "r": Counter(ranks.values()).most_common(1)[0][0] if ranks else None,
        "ranks": sorted(set(ranks.values())), "target_modules": kinds,
        "blocks": [blocks[0], blocks[-1]] if blocks else [], "n_modules": len(pairs),
        "n_parameters": sum(math.prod(_shape(t)) for t in reader.tensors), "n_tensors": len(reader.tensors),
        "outtype": next((k for k, v in _FILE_TYPES.items() if v == file_type), None),
        "dtypes": sorted({t.tensor_type.name for t in reader.tensors}),
        "size_bytes": Path(path).stat().st_size,
    }
