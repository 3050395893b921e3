"""Which module types LoRA can wrap, and the FrozenBase each linear kind gets: the one place that
checks base-layer types.

Linear kinds are tried in registration order, most specific first (a 4-bit layer that subclasses
nn.Linear registers before the dense one). Embeddings are adapted by lookup, not by a product.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import bnb4bit
from .conv1d import Conv1DBase, conv1d_type
from .dense import DenseLinear
from .gguf_linear import GGUFBase, GGUFLinear
from .linear4bit import Linear4bit, Linear4bitBase
from .protocol import FrozenBase

# (what it is called in messages, the module type or a function giving it, the FrozenBase factory)
_LINEAR: list[tuple[str, Callable[[], type | None], Callable[[nn.Module], FrozenBase]]] = []
_REFUSED: set[str] = set()  # labels of kinds whose factory refuses them (in one line), not adaptable


def register(label: str, module_type: type | Callable[[], type | None],
             factory: Callable[[nn.Module], FrozenBase], *, first: bool = False, refused: bool = False) -> None:
    """Make modules of `module_type` adaptable; `factory(module)` gives their FrozenBase. `refused`:
    a kind that looks adaptable (an nn.Linear subclass) but is not: its factory raises the reason."""
    if refused:
        _REFUSED.add(label)
    get = module_type if not isinstance(module_type, type) else (lambda: module_type)
    entry = (label, get, factory)
    _LINEAR.insert(0, entry) if first else _LINEAR.append(entry)


register("torch.nn.Linear", nn.Linear, DenseLinear)
register("transformers' Conv1D", conv1d_type, Conv1DBase)
register("lorakit's 4-bit Linear4bit", Linear4bit, Linear4bitBase)
register("lorakit's GGUFLinear", GGUFLinear, GGUFBase)
# bitsandbytes' Linear4bit subclasses nn.Linear: first, and only once the user imported bitsandbytes
register("bitsandbytes' Linear4bit", bnb4bit.linear4bit_type, bnb4bit.BnbLinear4bitBase, first=True)
register("bitsandbytes' Linear8bitLt", bnb4bit.linear8bit_type, bnb4bit.refuse_8bit, first=True, refused=True)


def frozen_base(module: nn.Module) -> FrozenBase | None:
    """The FrozenBase for a linear module, or None when it is no linear kind LoRA knows."""
    for _, get, factory in _LINEAR:
        kind = get()
        if kind is not None and isinstance(module, kind):
            return factory(module)
    return None


# Linear kinds whose frozen weight is buffers (4-bit codes, GGUF blocks), not a weight parameter:
# FSDP (which shards parameters) cannot shard them.
_WEIGHT_IN_BUFFERS = {Linear4bit: "4-bit", GGUFLinear: "GGUF"}


def weight_in_buffers(module: nn.Module) -> str | None:
    """What kind of base `module` is ("4-bit", "GGUF") when its weight is buffers, else None."""
    return next((label for kind, label in _WEIGHT_IN_BUFFERS.items() if isinstance(module, kind)), None)


def is_linear(module: nn.Module) -> bool:
    return any((kind := get()) is not None and isinstance(module, kind) for _, get, _ in _LINEAR)


def uncounted_weight_numel(module: nn.Module) -> int:
    """The weight values of a packed linear (4-bit, GGUF blocks) that its parameters do not count.

    A packed weight is a buffer (lorakit's kinds) or a parameter of packed bytes (bitsandbytes'
    Params4bit, half the values); parameter counts report the model's logical size, as PEFT does,
    so they add in x out less what `parameters()` already holds. 0 for dense layers.
    """
    if not is_linear(module) or not hasattr(module, "in_features"):
        return 0
    weight = module._parameters.get("weight")
    counted = weight.numel() if weight is not None else 0
    return max(0, module.in_features * module.out_features - counted)


def uncounted_weight_elements(model: nn.Module) -> int:
    """What `model.parameters()` leaves out of its packed layers' weights (`uncounted_weight_numel`)."""
    return sum(uncounted_weight_numel(m) for m in model.modules())


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def is_adaptable(module: nn.Module) -> bool:
    return is_linear(module) or is_embedding(module)


def adaptable_types() -> list[str]:
    return [label for label, get, _ in _LINEAR if get() is not None and label not in _REFUSED] + ["torch.nn.Embedding"]


def check_adaptable(name: str, module: nn.Module) -> None:
    """TypeError naming the module and its type unless LoRA can wrap it."""
    if not is_adaptable(module):
        raise TypeError(
            f"cannot adapt module {name!r} of type {type(module).__name__}; "
            f"adaptable types are {', '.join(adaptable_types())}"
        )
