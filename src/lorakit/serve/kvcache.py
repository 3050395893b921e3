"""A key/value cache made of slots: batch row i of every step is slot i, one request per slot.

transformers' attention layers call `cache.update(key, value, layer_idx)` and attend over what
it returns. Here each request keeps its keys and values in its own slot, at its own positions,
so requests of different lengths share one batch without padding each other: the engine
passes a mask that shows each row only its own filled positions. Requests join by being
prefilled into free slots and leave by having the last slot moved into their place, so the
running batch always occupies slots 0..n-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_CAPACITY = 64  # positions per slot allocated at first; doubled as requests grow


@dataclass(frozen=True)
class _Prefill:
    first_slot: int
    rows: int


@dataclass(frozen=True)
class _Decode:
    positions: Tensor  # (rows,) where each row's new key goes
    length: int  # positions 0..length-1 are returned for attention


class SlotKVCache:
    """Per layer, keys and values of shape (slots, kv_heads, capacity, head_dim)."""

    def __init__(self, slots: int, max_len: int) -> None:
        self.slots = slots
        self.max_len = max_len
        self.capacity = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self._plan: _Prefill | _Decode | None = None

    # -- planning the next forward (the engine calls these) ------------------------------------
    def plan_prefill(self, first_slot: int, rows: int, length: int) -> None:
        """The next forward writes `rows` new prompts of up to `length` tokens from `first_slot` on."""
        if first_slot + rows > self.slots:
            raise ValueError(f"prefill of {rows} rows from slot {first_slot} exceeds the {self.slots} slots")
        self._reserve(length)
        self._plan = _Prefill(first_slot, rows)

    def plan_decode(self, positions: Tensor) -> None:
        """The next forward adds one token to each of slots 0..len(positions)-1, at `positions`."""
        length = int(positions.max()) + 1
        self._reserve(length)
        self._plan = _Decode(positions, length)

    def _reserve(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"a sequence of {length} positions exceeds the context of {self.max_len}")
        if length <= self.capacity:
            return
        capacity = max(MIN_CAPACITY, self.capacity)
        while capacity < length:
            capacity *= 2
        self.capacity = min(capacity, self.max_len)
        self.keys = [_grown(t, self.capacity) for t in self.keys]
        self.values = [_grown(t, self.capacity) for t in self.values]

    # -- the interface transformers' attention calls -------------------------------------------
    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values for `layer_idx`; return what the step attends over."""
        if layer_idx == len(self.keys):
            shape = (self.slots, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        keys, values, plan = self.keys[layer_idx], self.values[layer_idx], self._plan
        if isinstance(plan, _Prefill):  # key: (rows, kv_heads, length, head_dim)
            end = plan.first_slot + plan.rows
            keys[plan.first_slot : end, :, : key.shape[2]] = key
            values[plan.first_slot : end, :, : key.shape[2]] = value
            return key, value  # a new prompt attends only to itself
        if isinstance(plan, _Decode):  # key: (rows, kv_heads, 1, head_dim)
            rows = torch.arange(key.shape[0], device=key.device)
            keys[rows, :, plan.positions] = key[:, :, 0]
            values[rows, :, plan.positions] = value[:, :, 0]
            return keys[: key.shape[0], :, : plan.length], values[: key.shape[0], :, : plan.length]
        raise RuntimeError("SlotKVCache.update called without plan_prefill/plan_decode")

    # -- slots ---------------------------------------------------------------------------------
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (the batch shrinking)."""
        for t in (*self.keys, *self.values):
            t[dst, :, :length] = t[src, :, :length]

    def reset(self) -> None:
        """Free the buffers (the engine is idle); they are allocated again on the next prefill."""
        self.keys, self.values, self.capacity, self._plan = [], [], 0, None

    # transformers asks a few questions of any cache object; the engine passes masks and
    # positions itself, so these answers only need to be harmless.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._plan is None or isinstance(self._plan, _Prefill) else self._plan.length - 1

    def __len__(self) -> int:
        return len(self.keys)


def _grown(t: Tensor, capacity: int) -> Tensor:
    new = t.new_zeros((t.shape[0], t.shape[1], capacity, t.shape[3]))
    new[:, :, : t.shape[2]] = t
    return new
