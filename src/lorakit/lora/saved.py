"""PEFT's `modules_to_save`: a trainable copy of a whole module per adapter (e.g. a new head)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .routing import Route, current_route


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy of a whole module per adapter (PEFT's `modules_to_save`), e.g. a new head."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _pick(self, names: tuple[str, ...]) -> nn.Module:
        for name in names:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        route = current_route() or Route(names=tuple(self.active_adapters))
        if route.rows is None:
            return self._pick(route.names)(x, *args, **kwargs)
        outputs = [self._pick((name,))(x[i : i + 1], *args, **kwargs) for i, name in enumerate(route.rows)]
        return torch.cat(outputs, dim=0)
