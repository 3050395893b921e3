"""Resolving a model for inference: the base (as named, or as the adapter records it), with
each adapter loaded under its directory's name; what `generate`, `chat`, `merge` and the demo load.

    model, tokenizer = load_for_inference("smollm2-135m", ["runs/demo/adapter"])
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..lora.config import CONFIG_NAME
from ..lora.names import adapter_names_for
from .embedded import BUILTIN_MODELS
from .load import load_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from ..bases.quant_config import QuantConfig

DEFAULT_MODEL = "smollm2-135m"


def load_for_inference(
    model_name: str | None,
    adapters: Sequence[str | os.PathLike] = (),
    *,
    dtype: str | None = None,
    device: str | None = None,
    quantization: QuantConfig | str | None = None,
    packed: bool | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The base model with each adapter loaded under its own name, plus the tokenizer.

    Without `model_name`, the first adapter's `base_model_name_or_path` is used when it is
    available here, else the built-in default. With no adapters the plain model comes back;
    with adapters a PeftModel whose adapter names are `adapter_names_for(adapters)`.
    `quantization` is load_model's (the base quantized to 4 bits before the adapters go on), and
    so is `packed` (a GGUF model's linear layers kept in the file's blocks; None: where they can be).
    """
    from ..lora.peft_model import PeftModel

    adapters = [os.fspath(a) for a in adapters]
    for path in adapters:
        check_adapter_dir(path)
    if model_name is None:
        model_name = base_model_of(adapters[0]) if adapters else DEFAULT_MODEL
    with quiet_loading():
        model, tokenizer = load_model(model_name, dtype=dtype, device=device, quantization=quantization, packed=packed)
    if not adapters:
        return model, tokenizer
    names = adapter_names_for(adapters)
    peft = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for path, adapter_name in zip(adapters[1:], names[1:]):
        peft.load_adapter(path, adapter_name=adapter_name)
    return peft.eval(), tokenizer


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-tensor "Loading weights" progress bar from transformers inside the block."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def check_adapter_dir(path: str | os.PathLike) -> None:
    """FileNotFoundError naming `path` unless it is a directory holding an adapter config."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory not found: {os.fspath(path)}")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"{os.fspath(path)} is not an adapter directory (no {CONFIG_NAME})")


def base_model_of(adapter_dir: str | os.PathLike) -> str:
    """The adapter's recorded base model if it can be loaded here without a download, else the default."""
    with open(os.path.join(adapter_dir, CONFIG_NAME), encoding="utf-8") as fh:
        try:
            recorded = json.load(fh).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            recorded = None
    if recorded and model_is_available(recorded):
        return recorded
    if recorded:
        print(f"lorakit: note: the adapter's base model {recorded!r} is not available here; "
              f"using {DEFAULT_MODEL!r} (pass --model to choose)", file=sys.stderr)
    return DEFAULT_MODEL


def model_is_available(name: str) -> bool:
    """A built-in name, an existing path, or a hub id already in the local Hugging Face cache."""
    if name.lower() in BUILTIN_MODELS or Path(name).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False
