"""lorakit models in transformers' Trainer and TRL's trainers.

transformers and TRL recognise adapter models by `isinstance(model, peft.PeftModel)`, so they
treat a lorakit model as a plain one (column pruning, saving, resuming, DPO's reference). These
drop-in subclasses give lorakit models the treatment PEFT models get, without importing peft:

    from lorakit.integrations import Trainer, SFTTrainer, DPOTrainer

transformers and TRL load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterTrainerMixin": "trainer",
    "Trainer": "trainer",
    "AdapterDisabled": "reference",
    "SFTTrainer": "trl_trainers",
    "DPOTrainer": "trl_trainers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
