"""Which adapters the server knows, which are in memory, and which to drop when memory is full.

Every adapter added stays *registered* (name -> directory) until deleted; at most `max_adapters`
are *resident* (loaded on the model). Past that the least recently used adapter that no running
request needs is unloaded, and loaded again from its directory when a request asks for it.

Methods that change the model (`add`, `remove`, `acquire`, `release`) must run on the engine
thread, between forward passes; the read-only ones may be called from any thread.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from typing import Any

from torch import nn

from lorakit.lora.routing import BASE

from .errors import AdapterError, BadRequest, NotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class AdapterRegistry:
    """Named adapters on one base model, loaded through lorakit's PeftModel."""

    def __init__(self, model: nn.Module, base_name: str, max_adapters: int | None = None) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.model = model
        self.base_name = base_name
        self.max_adapters = max_adapters
        self._handle: Any = None  # the PeftModel made by the first load
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}  # running requests per resident adapter
        self._removed: set[str] = set()  # deleted while in use: unloaded when the last user leaves
        self.loads = 0  # loads from disk, including reloads after eviction

    # -- questions (any thread) ----------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def path(self, name: str) -> str:
        with self._lock:
            if name not in self._paths:
                raise NotFound(f"The model {name!r} does not exist", param="model")
            return self._paths[name]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._paths

    def resident(self) -> list[str]:
        """Adapters in memory, least recently used first."""
        with self._lock:
            return list(self._resident)

    # -- changes (engine thread) ---------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike) -> None:
        """Register and load an adapter; raises AdapterError (model unchanged) if it does not fit."""
        self._check_new_name(name)
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise AdapterError(f"adapter directory not found: {path}", param="path")
        self._load(name, path)
        with self._lock:
            self._paths[name] = path
        self._trim()

    def remove(self, name: str) -> None:
        """Forget an adapter; it leaves memory now, or when the last request using it finishes."""
        with self._lock:
            if name not in self._paths:
                raise NotFound(f"adapter {name!r} is not loaded; loaded: {', '.join(self._paths) or 'none'}")
            del self._paths[name]
            busy = self._users.get(name, 0) > 0
            if busy:
                self._removed.add(name)
        if not busy and name in self._resident:
            self._unload(name)

    def acquire(self, name: str) -> bool:
        """Make `name` resident for one more request. False: no room until a running request ends."""
        with self._lock:
            if name not in self._paths:
                raise NotFound(f"The model {name!r} does not exist", param="model")
            path = self._paths[name]
        if name not in self._resident:
            if self.max_adapters is not None and len(self._resident) >= self.max_adapters:
                victim = self._least_recent_idle()
                if victim is None:
                    return False
                self._unload(victim)
            try:
                self._load(name, path)
            except AdapterError as err:
                raise AdapterError(f"adapter {name!r} could not be reloaded from {path}: {err}") from None
        with self._lock:
            self._resident.move_to_end(name)
            self._users[name] = self._users.get(name, 0) + 1
        return True

    def release(self, name: str) -> None:
        """One request using `name` finished."""
        with self._lock:
            self._users[name] -= 1
            idle = self._users[name] == 0
            doomed = idle and name in self._removed
        if doomed:
            self._removed.discard(name)
            self._unload(name)
        elif idle:
            self._trim()

    # -- internals -----------------------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise BadRequest(
                f"adapter name {name!r} must be 1-128 letters, digits or . _ : - (starting with a letter or digit)",
                param="name",
            )
        if name in (self.base_name, BASE):
            raise BadRequest(f"adapter name {name!r} is taken by the base model", param="name")
        with self._lock:
            if name in self._paths or name in self._removed:
                raise BadRequest(f"an adapter named {name!r} is already loaded; delete it first", param="name")

    def _least_recent_idle(self) -> str | None:
        with self._lock:
            return next((n for n in self._resident if self._users.get(n, 0) == 0), None)

    def _trim(self) -> None:
        """Unload idle adapters, least recently used first, until at most `max_adapters` remain."""
        while self.max_adapters is not None and len(self._resident) > self.max_adapters:
            victim = self._least_recent_idle()
            if victim is None:
                return
            self._unload(victim)

    def _load(self, name: str, path: str) -> None:
        from lorakit import LoraConfig, PeftModel

        try:
            config = LoraConfig.from_pretrained(path)
            if config.use_dora:
                raise AdapterError("DoRA adapters cannot run in mixed-adapter batches; merge it into a model instead")
            handle = PeftModel.from_pretrained(self.model, path, adapter_name=name, config=config)
            self._handle = self._handle or handle
        except AdapterError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise AdapterError(f"cannot load adapter {name!r} from {path}: {' '.join(str(err).split())}") from None
        self.model.eval()
        with self._lock:
            self._resident[name] = None
            self._users.setdefault(name, 0)
            self.loads += 1

    def _unload(self, name: str) -> None:
        self._handle.delete_adapter(name)
        with self._lock:
            self._resident.pop(name, None)
            self._users.pop(name, None)
