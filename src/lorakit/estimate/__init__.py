"""Sizing before fine-tuning: exact parameter counts and training memory from a model's config."""

from .api import GPUS, Estimate, GpuFit, Memory, estimate
from .params import ParamCount
from .presets import PRESETS

__all__ = ["GPUS", "PRESETS", "Estimate", "GpuFit", "Memory", "ParamCount", "estimate"]
