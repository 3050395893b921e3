"""Adapters as files: merge one into a standalone model directory, or describe what one holds."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..lora.config import CONFIG_NAME, LoraConfig
from ..lora.io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

_LORA_A = (".lora_A.weight", ".lora_embedding_A")
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> torch


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

    from ..models.inference import load_for_inference

    out = Path(out_dir).expanduser().absolute()
    _check_output_dir(out, overwrite)
    if Path(adapter_path).absolute() == out:
        raise ValueError(f"the output dir {out} is the adapter itself; choose another --output")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    peft, tokenizer = load_for_inference(model_name, [adapter_path], dtype="float32", device="cpu")
    merged = peft.merge_and_unload().to(getattr(torch, dtype or "float32"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model dir is normally shared
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output dir {out} is not empty; pass --overwrite to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old `out` is moved aside first and deleted only once `tmp` is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What an adapter dir holds: its config, ranks, adapted modules, parameters and bytes on disk.

    Counts come from the weight file's tensors (shapes only, nothing is loaded for safetensors),
    so they describe the file as it is, whatever its config claims.
    """
    from ..models.inference import check_adapter_dir

    directory = Path(path)
    check_adapter_dir(directory)
    config = LoraConfig.from_pretrained(directory)
    table = _tensor_table(directory)
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


def _tensor_table(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
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
