"""Adapters as files for other tools: merged model directories, what an adapter holds, and whether
serving engines will load it."""

from .check import check_adapter, planned_adapter, read_adapter
from .inspect import inspect_adapter
from .merged import merge_adapter_to_dir

__all__ = ["check_adapter", "inspect_adapter", "merge_adapter_to_dir", "planned_adapter", "read_adapter"]
