"""Merging an adapter into its base: a standalone model directory, written atomically.

A dense base gives a plain transformers directory. A 4-bit base (a bitsandbytes-layout 4-bit
directory, or any base with `quantization=`, the way a QLoRA run quantized it) is merged onto its
de-quantized weights, the ones the adapter was trained against: the result is a plain dense
directory as well, or with `requantize=True` a 4-bit directory again (`models.quantized`'s
layout), together with the rounding that caused (`lora.quantized_merge.RequantizeReport`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..bases.quant_config import QuantConfig
    from ..lora.quantized_merge import RequantizeReport

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MergedDir:
    path: Path
    quantized: bool  # the base had 4-bit layers (merged onto their de-quantized weights)
    report: RequantizeReport | None = None  # with requantize=True: the rounding of quantizing again


def merge_adapter_to_dir(
    model_name: str | None,
    adapter_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    quantization: QuantConfig | str | None = None,
) -> Path:
    """Write base + adapter, merged, as a plain transformers model dir (safetensors + tokenizer).

    The merge is done in float32 on the CPU and the result cast to `dtype` (default float32),
    so a half-precision export rounds once. A 4-bit base (or `quantization=`: quantize the base
    first, as the run that trained the adapter did) is merged onto its de-quantized weights.
    The directory appears whole or not at all: it is written beside its final place and renamed
    into it. An existing non-empty `out_dir` is replaced only with `overwrite`.
    """
    return write_merged(model_name, adapter_path, out_dir, overwrite=overwrite, dtype=dtype,
                        quantization=quantization).path


def write_merged(
    model_name: str | None,
    adapter_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    quantization: QuantConfig | str | None = None,
    requantize: bool = False,
) -> MergedDir:
    """`merge_adapter_to_dir`, plus `requantize=True`: a 4-bit base merged and quantized again,
    written as a 4-bit directory (`save_quantized`); the result says what that rounding was."""
    import torch

    from ..lora.io import atomic_dir
    from ..lora.quantized_merge import has_quantized
    from ..models.inference import load_for_inference
    from ..models.quantized import save_quantized

    out = Path(out_dir).expanduser().absolute()
    if out.suffix.lower() == ".gguf":
        raise ValueError(f"{out.name} is a GGUF file name: merge with export.merge_adapter_to_gguf for one")
    check_output_dir(out, overwrite)
    if Path(adapter_path).absolute() == out:
        raise ValueError(f"the output dir {out} is the adapter itself; choose another --output")
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    if requantize and dtype is not None:
        raise ValueError("--dtype does not apply with --requantize: the merged layers are stored in 4 bits again, "
                         "the other tensors as the base stores them")
    # A GGUF base merges onto its de-quantized blocks, packed or dense (the same values); requantize
    # writes a bitsandbytes 4-bit directory, which only a 4-bit base (not GGUF blocks) gives.
    peft, tokenizer = load_for_inference(model_name, [adapter_path], dtype="float32", device="cpu",
                                         quantization=quantization, packed=False if requantize else None)
    quantized = has_quantized(peft.base_model.model)
    if requantize and not quantized:
        raise ValueError("--requantize needs a 4-bit base: a 4-bit model directory as --model, or --quantize nf4|fp4")
    if requantize:
        merged = peft.merge_and_unload(requantize=True)
        report = merged.lorakit_requantize_report
    else:
        # 4-bit layers come back dense in fp32 (exact), so the one cast below is the only rounding
        merged = peft.merge_and_unload(dtype=torch.float32) if quantized else peft.merge_and_unload()
        merged, report = merged.to(getattr(torch, dtype or "float32")), None
    with atomic_dir(out) as tmp:
        if requantize:
            save_quantized(merged, tmp)
        else:
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model dir is normally shared
    return MergedDir(out, quantized, report)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty directory unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output dir {out} is not empty; pass --overwrite to replace it")
