"""Merging an adapter into its base: a standalone transformers model directory, written atomically."""

from __future__ import annotations

import os
from pathlib import Path


def merge_adapter_to_dir(
    model_name: str | None,
    adapter_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write base + adapter, merged, as a plain transformers model dir (safetensors + tokenizer).

    The merge is done in float32 on the CPU and the result cast to `dtype` (default float32),
    so a half-precision export rounds once. The directory appears whole or not at all: it is
    written beside its final place and renamed into it. An existing non-empty `out_dir` is
    replaced only with `overwrite`.
    """
    import torch

    from ..lora.io import atomic_dir
    from ..models.inference import load_for_inference

    out = Path(out_dir).expanduser().absolute()
    if out.suffix.lower() == ".gguf":
        raise ValueError(f"{out.name} is a GGUF file name: merge with export.merge_adapter_to_gguf for one")
    _check_output_dir(out, overwrite)
    if Path(adapter_path).absolute() == out:
        raise ValueError(f"the output dir {out} is the adapter itself; choose another --output")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    peft, tokenizer = load_for_inference(model_name, [adapter_path], dtype="float32", device="cpu")
    merged = peft.merge_and_unload().to(getattr(torch, dtype or "float32"))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model dir is normally shared
    return out


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output dir {out} is not empty; pass --overwrite to replace it")


