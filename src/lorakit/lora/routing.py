"""Which adapters a forward pass uses, carried with the call rather than stored on the model.

A `contextvars.ContextVar` is private to each thread (and asyncio task), so two threads running
different adapters through the same layers never see each other's choice. Layers read the route
at forward time; with no route set they fall back to their own active adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Route:
    """Either the same adapters for every row (`names`) or one adapter per batch row (`rows`)."""

    names: tuple[str, ...] = ()
    rows: tuple[str, ...] | None = None
    disabled: bool = False  # set by disable_adapter(): wins over any handle's own adapters


_ROUTE: ContextVar[Route | None] = ContextVar("lorakit_route", default=None)


def current_route() -> Route | None:
    return _ROUTE.get()


@contextmanager
def route(value: Route | None) -> Iterator[None]:
    token = _ROUTE.set(value)
    try:
        yield
    finally:
        _ROUTE.reset(token)


def disabled() -> AbstractContextManager[None]:
    """The bare base model for every call in this block, whichever handle makes it."""
    return route(Route(disabled=True))


def use_adapters(names: Sequence[str]) -> AbstractContextManager[None]:
    """Every row uses `names` (an empty sequence means the bare base model)."""
    return route(Route(names=tuple(names)))


def per_row_adapters(rows: Sequence[str]) -> AbstractContextManager[None]:
    """Row i of the batch uses adapter rows[i] (or BASE for none)."""
    # a new tuple for every call, even when given one: layers keep per-call plans keyed by it
    return route(Route(rows=tuple(list(rows))))
