"""A GGUF file's header, parsed once: its small metadata fields, its tensor table, and the
transformers config and tokenizer its metadata describes.

gguf-py's `GGUFReader` parses every metadata array (a 49k-token vocabulary and its merges) each
time it opens a file, and transformers opens it again for the config and once more for the
tokenizer: ~10 s for the embedded model before a byte of weight is read. `read_header` does that
work once per file and keeps the result in lorakit's cache, keyed like the dense conversion by the
file's real path, size and mtime (an edited file gets a new entry):

- ``header.json``: every metadata field that is not a long array, and per tensor its type, torch
  shape and the absolute offset and size of its bytes;
- ``config.json`` and the tokenizer files (`hf_dir`), written by transformers from the metadata.

`tensor_bytes` then reads a tensor as a uint8 view of one copy-on-write memory map of the file
(the file is never written). `open_gguf` is the checked reader: a bad magic, a truncated header or
tensor data past the end of the file are one-line errors naming the file.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .cache import build_dir_once
from .gguf import gguf_cache_path, gguf_tokenizer, require_gguf, settle_gguf_config

HEADER_NAME = "header.json"
HEADER_VERSION = 1
LONG_ARRAY = 64  # arrays longer than this (vocabularies, merges) stay in the file


def open_gguf(path: str | os.PathLike) -> Any:
    """A gguf.GGUFReader over `path`, or a one-line ValueError naming the file and what is wrong."""
    require_gguf()
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: bad magic {magic!r} (a GGUF file starts with b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: truncated or corrupt GGUF: its header or tensor data runs past the end "
                         f"of the file ({size} bytes; {err})") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path}: tensor {tensor.name}: data runs past the end of the file "
                             f"({tensor.data_offset + tensor.n_bytes} > {size} bytes)")
    return reader


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the table: its GGML type, torch shape (the reverse of GGUF's `ne`) and bytes."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    fields: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    _map: list = field(default_factory=list, compare=False, repr=False)  # the file's map, made on first use

    def field(self, key: str) -> Any:
        """A metadata field's value, or None when the file has none (or it is a long array)."""
        return self.fields.get(key)

    @property
    def architecture(self) -> str | None:
        return self.fields.get("general.architecture")

    def tensor_bytes(self, name: str) -> Tensor:
        """Tensor `name`'s bytes: a flat uint8 tensor over the file's memory map (no copy)."""
        if not self._map:  # copy-on-write: tensors over it are writable (torch asks for that), and a
            self._map.append(np.memmap(self.path, dtype=np.uint8, mode="c"))  # write never reaches the file
        entry = self.tensors[name]
        return torch.from_numpy(self._map[0][entry.offset:entry.offset + entry.n_bytes])


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """`path`'s header, from lorakit's cache (parsed with `open_gguf`'s checks on first use)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return _header(path.resolve(), _cache_root(path))


def hf_dir(path: str | os.PathLike) -> Path:
    """A directory holding the config.json and tokenizer files transformers derives from `path`'s
    metadata (its `quantization_config` dropped, a pad token set), built once."""
    path = Path(path)
    read_header(path)  # the checks first: transformers' own errors on a corrupt file are no help
    root = _cache_root(path)
    return build_dir_once(root.with_name(root.name + "-hf"), lambda tmp: _write_hf_files(path, tmp))


def _cache_root(path: Path) -> Path:
    root = gguf_cache_path(path)  # models/gguf-<stem>-<key>: the dense conversion's place
    return root.parent.parent / "gguf-headers" / root.name


@functools.lru_cache(maxsize=32)
def _header(path: Path, root: Path) -> GGUFHeader:
    final = build_dir_once(root, lambda tmp: _write_header(path, tmp / HEADER_NAME))
    data = json.loads((final / HEADER_NAME).read_text(encoding="utf-8"))
    if data.get("version") != HEADER_VERSION:
        raise ValueError(f"{final}: a header cache of another lorakit version; delete the directory")
    tensors = {name: GGUFTensor(name, qtype, tuple(shape), offset, n_bytes)
               for name, qtype, shape, offset, n_bytes in data["tensors"]}
    return GGUFHeader(path, data["fields"], tensors)


def _write_header(path: Path, out: Path) -> None:
    reader = open_gguf(path)
    fields = {}
    for key, entry in reader.fields.items():
        if key.startswith("GGUF.") or (len(entry.types) > 1 and len(entry.data) > LONG_ARRAY):
            continue  # the file's framing, and the long arrays (vocabulary, merges, scores)
        value = entry.contents()
        fields[key] = value.item() if isinstance(value, np.generic) else value
    tensors = [(t.name, int(t.tensor_type), [int(n) for n in reversed(t.shape.tolist())],
                int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    out.write_text(json.dumps({"version": HEADER_VERSION, "fields": fields, "tensors": tensors}), encoding="utf-8")


def _write_hf_files(path: Path, out: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = gguf_tokenizer(path, config.max_position_embeddings)
    settle_gguf_config(config, tokenizer)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
