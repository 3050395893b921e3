"""Loading a 16/32-bit safetensors checkpoint straight into 4 bits, one tensor at a time.

The model is built on the meta device (accelerate's init_empty_weights: parameters take no
memory, buffers such as the rotary `inv_freq` are made for real), every linear layer that
`quantize_model` would quantize becomes a `Linear4bit`, and then the checkpoint's tensors are
read one by one (each through its own `safe_open`, so no file stays mapped): a linear weight is
quantized as it is read and dropped, every other tensor is copied, in row chunks, into a tensor
of the model's dtype. Peak memory is the 4-bit model plus about one tensor; the 16- or 32-bit
model never exists. The result is bit-identical to `from_pretrained(dtype=...)` followed by
`quantize_model`.

Every check runs on the files' headers before a byte of data is read: a tensor the model needs
that no file holds, a shape that disagrees, a checkpoint that is not safetensors (a pickled
`pytorch_model.bin` is refused, never unpickled) are each a one-line error naming the file and key.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..bases.linear4bit import Linear4bit, WeightSource
from ..bases.quant_config import QuantConfig
from .quantize import check_targets, linear_targets

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# checkpoints lorakit does not read: pickles (and other frameworks' files)
NOT_SAFETENSORS = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.pt", "model.pth",
                   "tf_model.h5", "flax_model.msgpack")
CHUNK_BYTES = 64 << 20  # a dense tensor is copied in row blocks of about this size


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, as its file's header describes it."""

    file: Path
    shape: tuple[int, ...]


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: its index's shards, or model.safetensors."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        files = sorted(set(index_map(directory).values()))
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index}: names the shard {file.name!r}, which is not in {directory}")
        return files
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    for name in NOT_SAFETENSORS:
        if (directory / name).is_file():
            raise ValueError(f"{directory / name}: not a safetensors checkpoint; lorakit reads only safetensors "
                             "(it never unpickles): save it with save_pretrained(safe_serialization=True) first")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}) in {directory}")


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Bytes on disk of the checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in checkpoint_files(directory))


def checkpoint_dtype(directory: str | os.PathLike) -> str | None:
    """The dtype config.json says the checkpoint was saved in ("bfloat16", ...), or None."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def read_headers(files: list[Path]) -> dict[str, Entry]:
    """Every tensor's file and shape, from the headers alone (no tensor data is read)."""
    from safetensors import safe_open

    entries: dict[str, Entry] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in entries:
                    raise ValueError(f"{file}: key {key!r} is also in {entries[key].file}")
                entries[key] = Entry(file, tuple(f.get_slice(key).get_shape()))
    return entries


def read_tensor(entry: Entry, key: str) -> Tensor:
    """One tensor as stored (backed by its file's mapping until the tensor is dropped)."""
    return WeightSource(entry.file, key).read()


def read_into(entry: Entry, key: str, out: Tensor) -> Tensor:
    """Copy a stored tensor into `out` (cast to its dtype and device) a block of rows at a time,
    each block through its own mapping, so memory never holds more than `out` plus a block."""
    from safetensors import safe_open

    if not entry.shape:
        out.copy_(read_tensor(entry, key))
        return out
    row_bytes = out[0].numel() * out.element_size() if out.dim() > 1 else out.element_size()
    rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, entry.shape[0], rows):
        with safe_open(entry.file, framework="pt") as f:
            out[start : start + rows].copy_(f.get_slice(key)[start : start + rows])
    return out


def exact_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """True when every `source` value is exactly a `target` value (bf16 or fp16 to fp32), so
    quantizing the stored tensor gives the bytes quantizing its cast would."""
    return source == target or (source.is_floating_point and target.is_floating_point
                                and torch.promote_types(source, target) == target)


def skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `directory`'s config.json, parameters on meta (buffers real), tied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise ValueError(f"{directory / 'config.json'}: the checkpoint is already quantized ({method}); "
                         "lorakit quantizes 16/32-bit checkpoints")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


@dataclass(frozen=True)
class Slot:
    """Where a checkpoint tensor goes: the model's (first) name for it and the tensor there now."""

    name: str
    tensor: Tensor


def model_slots(model: nn.Module) -> dict[str, Slot]:
    """Every state-dict key of the model -> its slot; a tied name (a head tied to the embeddings)
    maps to the first name of the shared tensor."""
    first: dict[int, str] = {}
    slots = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        name = first.setdefault(id(tensor), key)
        slots[key] = Slot(name, tensor)
    return slots


def plan_reads(slots: dict[str, Slot], entries: dict[str, Entry], where: dict[str, Path], default: Path,
               ) -> dict[str, tuple[str, Entry]]:
    """Checkpoint key and entry to read for each slot name; every check made on headers only.

    ValueError (file and key named) for a shape that disagrees or a parameter no file holds (the
    file named is the shard the index says holds it, else `default`); a warning for a file
    tensor the model has no place for (ignored, as transformers does).
    """
    reads: dict[str, tuple[str, Entry]] = {}
    for key, entry in entries.items():
        slot = slots.get(key)
        if slot is None:
            warnings.warn(f"{entry.file}: key {key!r} is not in the model; ignored", stacklevel=3)
            continue
        if entry.shape != tuple(slot.tensor.shape):
            raise ValueError(f"{entry.file}: key {key!r} has shape {entry.shape}, the model expects "
                             f"{tuple(slot.tensor.shape)}")
        if slot.name not in reads or key == slot.name:  # a tied copy only when the first name is absent
            reads[slot.name] = (key, entry)
    for key, slot in slots.items():
        if slot.tensor.is_meta and slot.name not in reads:
            raise ValueError(f"{where.get(key, default)}: key {key!r} is missing")
    return reads


def index_map(directory: Path) -> dict[str, Path]:
    """The index's key -> shard file (empty for a one-file checkpoint)."""
    index = directory / INDEX_NAME
    if not index.is_file():
        return {}
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
    return {key: directory / name for key, name in weight_map.items()}


def _install_4bit(model: nn.Module, targets: list[str], config: QuantConfig, device: torch.device) -> dict[str, Linear4bit]:
    """Replace each target nn.Linear (on meta) by an empty Linear4bit on `device`."""
    layers = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        layers[name] = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                  quant_type=config.quant_type, blocksize=config.blocksize,
                                  double_quant=config.double_quant, weight_dtype=linear.weight.dtype,
                                  compute_dtype=config.compute_dtype, device=device)
        setattr(parent, child, layers[name])
    return layers


def _assign(model: nn.Module, name: str, value: Tensor) -> None:
    """Put `value` in place of the parameter or buffer `name` (a parameter keeps requires_grad)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


@torch.no_grad()
def load_streaming(directory: str | os.PathLike, config: QuantConfig | str = "nf4", *,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """The checkpoint in `directory` as a causal LM whose linear layers (but the output head and
    `config.skip_modules`) are lorakit's Linear4bit, quantized as they are read; in eval mode.

    `dtype` is the dtype of every other tensor and the one the 4-bit weights de-quantize to, as
    `from_pretrained(dtype=...)` then `quantize_model` would have them. Weights are quantized on
    `device`. Errors, all before any tensor data is read: see the module docstring.
    """
    config = QuantConfig.coerce(config)
    directory = Path(directory)
    device = torch.device(device)
    files = checkpoint_files(directory)
    entries = read_headers(files)
    model = skeleton(directory, dtype)
    targets = linear_targets(model, config)
    check_targets(targets, config)
    slots = model_slots(model)
    index = index_map(directory)
    reads = plan_reads(slots, entries, index, directory / INDEX_NAME if index else files[0])
    layers = _install_4bit(model, targets, config, device)
    for name, (key, entry) in sorted(reads.items(), key=lambda item: (str(item[1][1].file), item[1][0])):
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf == "weight":
            layer = layers[owner]
            layer.source = WeightSource(entry.file, key)  # what a LoftQ start reads back (lora.loftq)
            stored = layer.source.read()
            if not exact_cast(stored.dtype, layer.weight_dtype):
                stored = stored.to(layer.weight_dtype)  # as from_pretrained casts before quantize_model
            layer.quantize_(stored)  # on the layer's device
            del stored
        elif owner in layers:  # a 4-bit layer's bias
            read_into(entry, key, layers[owner].bias.data)
        else:
            like = slots[name].tensor
            _assign(model, name, read_into(entry, key, torch.empty(like.shape, dtype=like.dtype, device=device)))
    model.tie_weights()
    _load_generation_config(model, directory)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # plan_reads saw every slot; a model whose tying moves tensors after it would land here
        raise ValueError(f"{directory}: no tensor for {left[0]!r}")
    return model.to(device).eval()


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    """generation_config.json, as from_pretrained reads it (eos ids and sampling defaults)."""
    if (directory / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
