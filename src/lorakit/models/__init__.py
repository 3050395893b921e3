"""Loading base models: built-in names, local dirs, GGUF files and hub ids; with adapters for inference."""

from .cache import build_dir_once, cache_dir
from .embedded import BUILTIN_MODELS, BuiltinModel, builtin_gguf_path
from .gguf import convert_gguf, converted_gguf_dir
from .gguf_packed import load_packed_gguf
from .inference import (
    DEFAULT_MODEL,
    base_model_of,
    check_adapter_dir,
    load_for_inference,
    model_is_available,
    quiet_loading,
)
from .load import load_model, pick_device, pick_dtype, resolve_model_path
from .quantize import quantize_model
from .quantized import load_quantized, save_quantized
from .tokens import ensure_pad_token

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "DEFAULT_MODEL",
    "base_model_of",
    "build_dir_once",
    "builtin_gguf_path",
    "cache_dir",
    "check_adapter_dir",
    "convert_gguf",
    "converted_gguf_dir",
    "ensure_pad_token",
    "load_for_inference",
    "load_model",
    "load_packed_gguf",
    "load_quantized",
    "model_is_available",
    "pick_device",
    "pick_dtype",
    "quantize_model",
    "quiet_loading",
    "resolve_model_path",
    "save_quantized",
]
