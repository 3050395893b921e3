"""Adapter files: PEFT's key naming (one pure function, used for save and load) and atomic writes
of files and whole directories."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

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


def fsync_dir(path: Path) -> None:
    """Persist a rename inside `path` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_files(*finals: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield an empty temp path beside each of `finals`; when the block succeeds, each is flushed and
    renamed onto its final path (in order). On error every temp file is removed and no final path
    is touched, so a writer that streams a large file (a GGUF) never leaves it half-written."""
    temps: list[Path] = []
    try:
        for final in map(Path, finals):
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp in temps:
            _fsync_file(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; an exported file is normally shared
        for tmp, final in zip(temps, map(Path, finals)):
            os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it is renamed to `final` in one step.

    Readers see the old `final` (if any) or the complete new one, never a half-written one.
    On error, or if the process dies, only a `.tmp-*` sibling is left (see `clean_temp_dirs`).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        if final.exists():  # replace: move the old one aside first, since rename cannot replace a dir
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
