"""Adapters as files for other tools: merged model directories and GGUF files, llama.cpp's GGUF
adapters, what an adapter holds, and whether serving engines will load it."""

from .check import check_adapter, planned_adapter, read_adapter
from .gguf_adapter import export_gguf_adapter, inspect_gguf_adapter, read_gguf_adapter
from .gguf_model import merge_adapter_to_gguf
from .inspect import inspect_adapter
from .merged import merge_adapter_to_dir

__all__ = [
    "check_adapter", "export_gguf_adapter", "inspect_adapter", "inspect_gguf_adapter", "merge_adapter_to_dir",
    "merge_adapter_to_gguf", "planned_adapter", "read_adapter", "read_gguf_adapter",
]
