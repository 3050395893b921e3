"""Converting a GGUF file into a cached safetensors model directory.

Dequantising GGUF through transformers takes ~30 s; a safetensors directory loads in
~1 s, so each GGUF file is converted once and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import build_dir_once, cache_dir
from .tokens import ensure_pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def require_gguf() -> None:
    """Raise ModuleNotFoundError naming the extras that reading GGUF through transformers needs."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"loading GGUF needs {', '.join(missing)}: pip install 'lorakit[gguf]'")


def gguf_tokenizer(gguf_path: Path, context_length: int) -> PreTrainedTokenizerBase:
    """The tokenizer transformers builds from `gguf_path`'s metadata, pad token set; GGUF gives no
    length limit, so the context length is one."""
    from transformers import AutoTokenizer

    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name))
    if tokenizer.model_max_length > 10**20:
        tokenizer.model_max_length = context_length
    return tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise `gguf_path` to float32 and save model, tokenizer and chat template in `out_dir`."""
    require_gguf()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    tokenizer = gguf_tokenizer(gguf_path, model.config.max_position_embeddings)
    settle_gguf_config(model.config, tokenizer)
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def settle_gguf_config(config, tokenizer: PreTrainedTokenizerBase) -> None:
    """`config`, derived from a GGUF's metadata, made fit to save in a model directory: no
    quantization_config (the weights lorakit saves or reads are not transformers' GGUF path, and a
    kept one would make later loads look for the GGUF file again) and a pad token id (the
    tokenizer's, where the file names none)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def gguf_cache_path(gguf_path: Path) -> Path:
    """Cache dir for a user GGUF file, keyed by its real path, size and mtime (edits invalidate it)."""
    real = gguf_path.resolve()
    st = real.stat()
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", real.stem)
    return cache_dir() / "models" / f"gguf-{stem}-{key}"


def converted_gguf_dir(gguf_path: Path, final: Path | None = None) -> Path:
    """The converted model directory for `gguf_path`, converting on first use."""
    final = final if final is not None else gguf_cache_path(gguf_path)
    return build_dir_once(final, lambda tmp: convert_gguf(gguf_path, tmp))
