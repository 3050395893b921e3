"""Adapter files: PEFT's key naming (one pure function, used for save and load) and atomic writes."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_CONTAINERS = "lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save"


def file_key(key: str, adapter: str) -> str:
    """The key PEFT writes for in-memory parameter `key` (relative to the base model) of `adapter`.

    `layers.0.q_proj.lora_A.<adapter>.weight` -> `base_model.model.layers.0.q_proj.lora_A.weight`;
    `lm_head.modules_to_save.<adapter>.weight` -> `base_model.model.lm_head.weight`; keys that do not
    belong to an adapter (a bias trained with `bias="all"`) keep their name.
    """

    def drop_adapter(match: re.Match[str]) -> str:
        return "" if match.group(1) == "modules_to_save" else f".{match.group(1)}"

    pattern = rf"\.({_CONTAINERS})\.{re.escape(adapter)}(?=\.|$)"
    return PREFIX + re.sub(pattern, drop_adapter, key, count=1)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """safetensors, written atomically; tensors are made contiguous and moved to CPU first."""
    ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(ready, metadata={"format": "pt"}))


def load_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors: safetensors, or a legacy .bin through weights_only unpickling."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        return load_file(path)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")
