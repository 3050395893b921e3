"""Adapters as files for other tools: merged model directories, and what an adapter holds."""

from .inspect import inspect_adapter
from .merged import merge_adapter_to_dir

__all__ = ["inspect_adapter", "merge_adapter_to_dir"]
