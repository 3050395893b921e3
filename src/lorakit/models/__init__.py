"""Loading base models: built-in names, local dirs, GGUF files and hub ids."""

from .cache import build_dir_once, cache_dir
from .embedded import BUILTIN_MODELS, BuiltinModel, builtin_gguf_path
from .gguf import convert_gguf, converted_gguf_dir
from .load import load_model, pick_device, pick_dtype, resolve_model_path
from .tokens import ensure_pad_token

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "build_dir_once",
    "builtin_gguf_path",
    "cache_dir",
    "convert_gguf",
    "converted_gguf_dir",
    "ensure_pad_token",
    "load_model",
    "pick_device",
    "pick_dtype",
    "resolve_model_path",
]
