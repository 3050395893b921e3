"""Sizing before fine-tuning: exact parameter counts and training memory from a model's config."""

import sys
import types

from .api import GPUS, Estimate, GpuFit, Memory, estimate
from .params import ParamCount
from .presets import PRESETS

__all__ = ["GPUS", "PRESETS", "Estimate", "GpuFit", "Memory", "ParamCount", "estimate"]


class _CallableModule(types.ModuleType):
    """`lorakit.estimate(...)` works even where `lorakit.estimate` names this package."""

    def __call__(self, *args, **kwargs) -> Estimate:
        return estimate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
