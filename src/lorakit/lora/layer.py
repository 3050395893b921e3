"""What every LoRA wrapper shares: bookkeeping of named adapters, routing, merge state.

Each wrapper keeps the frozen base layer untouched (`base_layer`, PEFT's key layout) and holds
any number of named adapters (`lora_A[name]`, `lora_B[name]`, …). Which adapters run is decided
per call by `routing.current_route()`, falling back to the layer's own `active_adapters`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as LF
from .routing import current_route


class LoraLayer(nn.Module):
    adapter_attrs: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    # -- adapters -----------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first")
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        """Drop what was cached about this layer's adapters (subclasses cache plans)."""

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = self.base_layer.weight
        return weight.device, weight.dtype

    def _adapter_device_dtype(self, autocast: bool = True) -> tuple[torch.device, torch.dtype]:
        """Where new adapters live: in fp32 (fp64 beside an fp64 base), or with `autocast=False`
        (PEFT's autocast_adapter_dtype=False) in the base's own dtype."""
        device, dtype = self._base_device_dtype()
        if not autocast or dtype == torch.float64:
            return device, dtype
        return device, torch.float32

    # -- routing ------------------------------------------------------------------------------
    def _wanted(self) -> tuple[tuple[str, ...] | None, Sequence[str]]:
        """(one adapter per batch row, or None; the adapters every row uses) for this call."""
        route = current_route()
        if route is None:
            return None, self.active_adapters
        return route.rows, route.names

    def _check_merge_state(self, names: tuple[str, ...]) -> bool:
        """True when the merged weights already are what this call asks for."""
        if not self.merged_adapters:
            return False
        wanted = [n for n in names if n in self.r]
        if sorted(wanted) == sorted(self.merged_adapters):
            return True
        raise ValueError(
            f"adapter(s) {self.merged_adapters} are merged into the base weights, but this call asks for "
            f"{wanted or 'the base model'}; call unmerge_adapter() first"
        )

    # -- merge --------------------------------------------------------------------------------
    def _delta(self, name: str) -> Tensor:
        """Adapter `name`'s change to the weight, laid out as `_weight()` is."""
        raise NotImplementedError

    def _weight(self) -> Tensor:
        """The base weight merges work on (a linear's (out, in); an embedding's table)."""
        raise NotImplementedError

    def _store(self, weight: Tensor) -> None:
        """Write a merged weight back into the base."""
        raise NotImplementedError

    def check_mergeable(self) -> None:
        """Raise MergeRefused when this layer's base cannot take merged weights (nothing changes)."""

    def _pending(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.r and n not in self.merged_adapters]

    def merged_weight(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """The base weight with adapter `name` merged in, plus what unmerging needs (DoRA's norm)."""
        return LF.merge(weight, self._delta(name)), None

    def merged_aside(self, adapter_names: list[str] | None = None, weight: Tensor | None = None) -> Tensor:
        """The base weight (or `weight`, laid out as `_weight()`) with these adapters merged,
        computed aside: the layer is untouched."""
        weight = self._weight() if weight is None else weight
        for name in self._pending(adapter_names):
            weight, _ = self.merged_weight(name, weight)
        return weight

    def merge_is_finite(self, adapter_names: list[str] | None = None) -> bool:
        """Would merging these adapters give finite weights? Computed aside, the layer is untouched."""
        return bool(torch.isfinite(self.merged_aside(adapter_names)).all())

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for name in self._pending(adapter_names):
            if safe_merge and not self.merge_is_finite([name]):
                raise ValueError(f"merging adapter {name!r} produced NaN or inf weights; the model was left unchanged")
            self._merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _merge_one(self, name: str) -> None:
        self._store(self.merged_weight(name, self._weight())[0])

    def _unmerge_one(self, name: str) -> None:
        self._store(LF.unmerge(self._weight(), self._delta(name)))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.r)
