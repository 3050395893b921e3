"""4-bit model directories in the layout transformers + bitsandbytes write, without bitsandbytes.

Per quantized linear layer `<name>` the safetensors hold (`bnb_key` names them, for save and
load alike): `<name>.weight` (packed uint8, (ceil(n / 2), 1)), `.weight.absmax`,
`.weight.quant_map` (the 16 code values), with double quant `.weight.nested_absmax` and
`.weight.nested_quant_map`, and `.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a uint8
tensor holding the JSON of bitsandbytes' `QuantState.as_dict(packed=True)` (quant_type,
blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset). config.json carries
transformers' `BitsAndBytesConfig.to_dict()` as `quantization_config`. Every other tensor is
stored as in a plain transformers checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..bases import quant4
from ..bases.linear4bit import Linear4bit
from ..lora.io import atomic_dir, atomic_write_bytes, save_tensors

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_FIELDS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state")
_NESTED_FIELDS = ("nested_absmax", "nested_quant_map")


def bnb_key(name: str, field: str, quant_type: str) -> str:
    """The file key of `field` (one of _FIELDS) of the 4-bit layer `name`."""
    if field == "weight":
        return f"{name}.weight"
    if field == "quant_state":
        return f"{name}.weight.quant_state.bitsandbytes__{quant_type}"
    return f"{name}.weight.{field}"


def quantization_config(layers: list[Linear4bit], skip_modules: list[str]) -> dict[str, Any]:
    """transformers' BitsAndBytesConfig(load_in_4bit=True, ...).to_dict() for these layers."""
    first = layers[0]
    settings = {(m.quant_type, m.double_quant, m.compute_dtype or m.weight_dtype) for m in layers}
    if len(settings) > 1:
        raise ValueError(f"the 4-bit layers differ in (quant_type, double_quant, compute_dtype): {sorted(map(str, settings))}")
    compute = first.compute_dtype or first.weight_dtype
    return {
        "quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True, "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip_modules or None, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": first.double_quant, "bnb_4bit_compute_dtype": _dtype_name(compute),
        "bnb_4bit_quant_storage": "uint8", "load_in_4bit": True, "load_in_8bit": False,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_tensors(name: str, layer: Linear4bit) -> dict[str, Tensor]:
    """One Linear4bit's weight as bitsandbytes' Params4bit + QuantState.as_dict(packed=True) write it."""
    state: dict[str, Any] = {"quant_type": layer.quant_type, "blocksize": layer.blocksize,
                             "dtype": _dtype_name(layer.weight_dtype), "shape": [layer.out_features, layer.in_features]}
    q = layer.quant_type
    out = {bnb_key(name, "weight", q): layer.weight, bnb_key(name, "absmax", q): layer.absmax,
           bnb_key(name, "quant_map", q): quant4.code(q).clone()}
    if layer.double_quant:
        out[bnb_key(name, "nested_absmax", q)] = layer.nested_absmax
        out[bnb_key(name, "nested_quant_map", q)] = layer.nested_quant_map
        state.update(nested_blocksize=quant4.ABSMAX_BLOCKSIZE, nested_dtype="float32", nested_offset=layer.offset.item())
    out[bnb_key(name, "quant_state", q)] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a model with Linear4bit layers as a transformers + bitsandbytes 4-bit directory
    (config.json, model.safetensors, generation_config.json when the model has one, and the
    `tokenizer`'s files when given); it appears whole or not at all (written beside, renamed in)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("the model has no Linear4bit layer to save; quantize it first (lorakit.quantize_model)")
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf != "bias":
            continue  # written below in bitsandbytes' layout
        tensors[key] = value
    tensors = _without_tied_copies(tensors)
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    dense = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(list(layers.values()), dense)
    out = Path(directory).expanduser().absolute()
    with atomic_dir(out) as tmp:
        save_tensors(tensors, tmp / WEIGHTS_NAME)
        atomic_write_bytes(tmp / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model dir is normally shared
    return out


def _without_tied_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop every later name of a tensor already stored (a head tied to the embeddings), as
    transformers does; safetensors refuses shared storage."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for key, value in tensors.items():
        ident = (value.data_ptr(), tuple(value.shape))
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = value
    return out


# -- reading ------------------------------------------------------------------------------------
def bnb_4bit_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The directory's bitsandbytes 4-bit `quantization_config`, or None when it has none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("quantization_config") or {}
    if config.get("quant_method") == "bitsandbytes" and (config.get("load_in_4bit") or config.get("_load_in_4bit")):
        return config
    return None


def _read_tensors(directory: Path) -> dict[str, tuple[str, Tensor]]:
    """Every tensor of the checkpoint, key -> (file name, tensor)."""
    from safetensors.torch import load_file

    index = directory / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}) in {directory}")
    return {key: (name, t) for name in files for key, t in load_file(directory / name).items()}


class _Layer:
    """One 4-bit layer read from the files, checked against its quant state."""

    def __init__(self, name: str, quant_type: str, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.name, self.quant_type, self.state, self.tensors = name, quant_type, state, tensors
        self.shape = tuple(state["shape"])
        self.double_quant = "nested_offset" in state


def _layer(name: str, files: dict[str, tuple[str, Tensor]], default_type: str) -> _Layer:
    weight_file = files[f"{name}.weight"][0]
    types = [q for q in quant4.QUANT_TYPES if bnb_key(name, "quant_state", q) in files]
    if not types:
        raise ValueError(f"{weight_file}: key {bnb_key(name, 'quant_state', default_type)!r} is missing")
    q = types[0]
    state_file, packed_state = files[bnb_key(name, "quant_state", q)]
    state = json.loads(bytes(packed_state.tolist()).decode())
    fields = [f for f in _FIELDS[:-1] if f not in _NESTED_FIELDS or "nested_offset" in state]
    tensors = {}
    for field in fields:
        key = bnb_key(name, field, q)
        if key not in files:
            raise ValueError(f"{state_file}: key {key!r} is missing")
        tensors[field] = files[key][1]
    layer = _Layer(name, q, state, tensors)
    n = torch.Size(layer.shape).numel()
    quant4.check_blocksize(state["blocksize"])
    blocks = -(-n // state["blocksize"])
    expected = {"weight": (n + 1) // 2, "absmax": blocks, "quant_map": 16}
    if layer.double_quant:
        if state.get("nested_blocksize") != quant4.ABSMAX_BLOCKSIZE:
            raise ValueError(f"{state_file}: key {bnb_key(name, 'quant_state', q)!r} has nested_blocksize "
                             f"{state.get('nested_blocksize')!r}, expected {quant4.ABSMAX_BLOCKSIZE}")
        expected.update(nested_absmax=-(-blocks // quant4.ABSMAX_BLOCKSIZE), nested_quant_map=256)
    for field, numel in expected.items():
        if tensors[field].numel() != numel:
            raise ValueError(f"{files[bnb_key(name, field, q)][0]}: key {bnb_key(name, field, q)!r} has shape "
                             f"{tuple(tensors[field].shape)}, expected {numel} values for a {layer.shape} weight")
    if not torch.allclose(tensors["quant_map"].float(), quant4.code(q), rtol=0, atol=1e-6):
        raise ValueError(f"{files[bnb_key(name, 'quant_map', q)][0]}: key {bnb_key(name, 'quant_map', q)!r} "
                         f"is not bitsandbytes' {q} code")
    return layer


def _buffers(layer: _Layer) -> dict[str, Tensor]:
    """The Linear4bit buffers (lorakit's names, relative to the layer) for a layer read from files."""
    t = layer.tensors
    out = {"weight": t["weight"].reshape(-1, 1).to(torch.uint8),
           "absmax": t["absmax"].to(torch.uint8 if layer.double_quant else torch.float32)}
    if layer.double_quant:
        out.update(nested_absmax=t["nested_absmax"].float(), nested_quant_map=t["nested_quant_map"].float(),
                   offset=torch.tensor(float(layer.state["nested_offset"]), dtype=torch.float32))
    return out


def load_quantized(directory: str | os.PathLike) -> nn.Module:
    """A transformers + bitsandbytes 4-bit directory as a causal LM with lorakit's Linear4bit
    layers, on the CPU, in eval mode; bitsandbytes is not needed.

    The skeleton is built on the meta device (accelerate's init_empty_weights) and filled with
    the file's tensors, so the full-precision weights never exist. A missing key or a shape
    that disagrees is a ValueError naming the file and the key, raised before anything is kept.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    qconfig = bnb_4bit_config(directory)
    if qconfig is None:
        raise ValueError(f"{directory / 'config.json'}: no bitsandbytes 4-bit quantization_config")
    files = _read_tensors(directory)
    names = sorted({k.rpartition(".weight.")[0] for k in files if ".weight.quant_state." in k or k.endswith(".weight.absmax")}
                   | {k.removesuffix(".weight") for k, (_, t) in files.items() if k.endswith(".weight") and t.dtype == torch.uint8})
    layers = {n: _layer(n, files, qconfig.get("bnb_4bit_quant_type", "nf4")) for n in names}
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # lorakit's own layers hold the 4 bits; transformers must not quantize
    compute = qconfig.get("bnb_4bit_compute_dtype")
    compute = getattr(torch, compute) if compute else None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # so the expected tensors show which names share one (a tied head)
    for name, layer in layers.items():
        module = model.get_submodule(name) if _has_module(model, name) else None
        if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != layer.shape:
            found = "no linear layer" if not isinstance(module, nn.Linear) else f"({module.out_features}, {module.in_features})"
            raise ValueError(f"{files[bnb_key(name, 'quant_state', layer.quant_type)][0]}: key "
                             f"{bnb_key(name, 'quant_state', layer.quant_type)!r} is a {layer.shape} weight; the model has {found} there")
        four = Linear4bit(layer.shape[1], layer.shape[0], module.bias is not None, quant_type=layer.quant_type,
                          blocksize=layer.state["blocksize"], double_quant=layer.double_quant,
                          weight_dtype=getattr(torch, layer.state["dtype"]), compute_dtype=compute, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, four)
    state = {f"{n}.{k}": v for n, layer in layers.items() for k, v in _buffers(layer).items()}
    quantized_keys = {bnb_key(n, f, layer.quant_type) for n, layer in layers.items() for f in _FIELDS}
    expected = model.state_dict(keep_vars=True)
    for key, (file, tensor) in files.items():
        if key in quantized_keys:
            continue
        if key not in expected:
            warnings.warn(f"{file}: key {key!r} is not in the model; ignored", stacklevel=2)
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}")
        state[key] = tensor
    _check_complete(expected, state, directory)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{directory}: no tensor for {left[0]!r}")
    return model.eval()


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_complete(expected: dict[str, Tensor], state: dict[str, Tensor], directory: Path) -> None:
    """ValueError for a model tensor the files lack, unless it is tied to one they have."""
    given = {id(expected[k]) for k in state if k in expected}
    for key, tensor in expected.items():
        if key not in state and id(tensor) not in given:
            raise ValueError(f"{directory / WEIGHTS_NAME}: key {key!r} is missing")
