"""What an adapter directory holds, read from its files: config, ranks, modules, sizes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..lora.config import CONFIG_NAME, LoraConfig
from ..lora.io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

_LORA_A = (".lora_A.weight", ".lora_embedding_A")
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> torch


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What an adapter dir holds: its config, ranks, adapted modules, parameters and bytes on disk
    (a ``.gguf`` file: what `gguf_adapter.inspect_gguf_adapter` reads from it).

    Counts come from the weight file's tensors (shapes only, nothing is loaded for safetensors),
    so they describe the file as it is, whatever its config claims.
    """
    from ..models.inference import check_adapter_dir

    if os.fspath(path).lower().endswith(".gguf"):  # llama.cpp's LoRA adapter file
        from .gguf_adapter import inspect_gguf_adapter

        return inspect_gguf_adapter(path)
    directory = Path(path)
    check_adapter_dir(directory)
    config = LoraConfig.from_pretrained(directory)
    table = tensor_table(directory)
    shapes = {k: shape for k, (shape, _) in table.items()}
    # lora_A is (r, in_features), lora_embedding_A (r, num_embeddings): one per adapted module
    ranks = {key.rsplit(".lora_", 1)[0]: shape[0] for key, shape in shapes.items() if key.endswith(_LORA_A)}
    targets = config.target_modules
    return {
        "path": str(directory),
        "base_model": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, set) else targets,
        "lora_dropout": config.lora_dropout,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "modules_to_save": config.modules_to_save,
        "task_type": config.task_type,
        "ranks": sorted(set(ranks.values())),
        "n_modules": len(ranks),
        "n_parameters": sum(math.prod(shape) for shape in shapes.values()),
        "n_tensors": len(shapes),
        "dtypes": sorted({dtype for _, dtype in table.values()}),
        "size_bytes": _weights_file(directory).stat().st_size,
        "size_on_disk_bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
        "other_adapters": sorted(
            p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}") if p.parent != directory
        ),
    }


def _weights_file(directory: Path) -> Path:
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")


def tensor_table(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, dtype); safetensors are read from the header alone."""
    weights = _weights_file(directory)
    if weights.name == WEIGHTS_NAME:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(weights, framework="pt") as fh:
                return {
                    k: (tuple(fh.get_slice(k).get_shape()), _DTYPES.get(fh.get_slice(k).get_dtype(), fh.get_slice(k).get_dtype()))
                    for k in fh.keys()
                }
        except SafetensorError as err:
            raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    from ..lora.io import load_adapter_weights

    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in load_adapter_weights(directory).items()
    }
