"""The LoRA wrappers, and the one table from a module to the wrapper it gets."""

from __future__ import annotations

from torch import nn

from .. import bases
from .embedding import Embedding
from .layer import LoraLayer
from .linear import Linear
from .saved import ModulesToSaveWrapper


def wrapper_for(name: str, module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for module `name`; bases.check_adaptable's error for types LoRA cannot wrap."""
    base = bases.frozen_base(module)
    if base is not None:
        return Linear(module, base)
    bases.check_adaptable(name, module)
    return Embedding(module)


__all__ = ["Embedding", "Linear", "LoraLayer", "ModulesToSaveWrapper", "wrapper_for"]
