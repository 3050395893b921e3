"""Mixed-adapter batches: row i of a batch uses adapter rows[i], for a LoRA linear.

The adapters present are stacked, (adapters, in, r_max) and (adapters, r_max, out) with ranks
zero-padded and the scaling folded in. Rows are gathered into equal-size groups, one per
adapter, and two batched matmuls compute every group's low-rank term at once: the work of one
rank-r product per row, whatever the mix, and no loop over adapters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Stacked:
    A: Tensor  # (adapters, in, r_max)
    B: Tensor  # (adapters, r_max, out), scaling folded in
    bias: Tensor | None  # (adapters, out), scaling folded in


@dataclass(frozen=True)
class RowPlan:
    """One call's rows: the adapters present, where each row goes, and their stacked weights."""

    present: tuple[str, ...]
    src: Tensor | None  # (groups * size,): the row each slot reads; None when rows are grouped already
    dst_rows: Tensor | None  # every row that has an adapter, in row order
    dst_slots: Tensor | None  # ... and its slot; None like src
    stacked: Stacked | None


class MixedRows:
    """A layer's mixed-batch state: the stacked weights and the last call's row plan, cached."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self.clear()

    def clear(self) -> None:
        self._stack_key: tuple | None = None  # (names, params, fingerprint)
        self._stack: Stacked | None = None
        self._rows: tuple | None = None  # (rows object, device, RowPlan)

    def forward(self, x: Tensor, rows: tuple[str, ...], result: Tensor) -> Tensor:
        """`result` (the base's output for x) plus each row's adapter term."""
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows")
        plan = self._row_plan(rows, x.device)
        if not plan.present:
            return result
        st, groups, src = plan.stacked, len(plan.present), plan.src
        xs = x.to(st.A.dtype)
        xs = xs if src is None else xs.index_select(0, src)  # (groups * size, ..., in)
        delta = torch.bmm(xs.reshape(groups, -1, x.shape[-1]), st.A)  # (groups, size * tokens, r_max)
        if src is None and st.bias is None and result.dtype == delta.dtype:  # grouped rows: add in place
            result.view(groups, -1, result.shape[-1]).baddbmm_(delta, st.B)
            return result
        delta = torch.bmm(delta, st.B)  # (groups, size * tokens, out)
        if st.bias is not None:
            delta = delta + st.bias.unsqueeze(1)
        delta = delta.reshape(-1, *result.shape[1:])
        delta = (delta if plan.dst_slots is None else delta.index_select(0, plan.dst_slots)).to(result.dtype)
        if plan.dst_rows.shape[0] == result.shape[0]:  # every row has an adapter (dst_rows is 0, 1, …)
            return result.add_(delta)
        return result.index_add_(0, plan.dst_rows, delta)

    def _row_plan(self, rows: tuple[str, ...], device: torch.device) -> RowPlan:
        """Kept for the same `rows` object, which one mixed `generate` passes to every layer at
        every step: the weights are checked once per call, not once per token."""
        cached = self._rows
        if cached is not None and cached[0] is rows and cached[1] == device:
            return cached[2]
        layer = self.layer
        present = tuple(sorted(n for n in set(rows) if n in layer.r))
        if any(layer.uses_dora(n) for n in present):
            raise ValueError("mixed-adapter batches support plain LoRA adapters (not DoRA)")
        plan = RowPlan(present, None, None, None, None)
        if present:
            src, dst_rows, dst_slots = (t.to(device) if t is not None else None for t in _group_plan(rows, present))
            plan = RowPlan(present, src, dst_rows, dst_slots, self._stacked(present))
        self._rows = (rows, device, plan)
        return plan

    def _stacked(self, names: tuple[str, ...]) -> Stacked:
        """Adapters stacked for batched matmuls, cached until an adapter's weights change.

        The check runs in every mixed forward of every layer, so it only compares the cached
        parameters' versions and storages (update_layer drops the cache when adapters change).
        """
        layer = self.layer
        key = self._stack_key
        if key is not None and key[0] == names and key[2] == _fingerprint(key[1]):
            return self._stack
        params = [p for n in names for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
        r_max = max(layer.r[n] for n in names)
        A0 = layer.lora_A[names[0]].weight
        with torch.no_grad():
            A_stack = A0.new_zeros(len(names), layer.in_features, r_max)
            B_stack = A0.new_zeros(len(names), r_max, layer.out_features)
            for i, n in enumerate(names):
                r = layer.r[n]
                A_stack[i, :, :r] = layer.lora_A[n].weight.t()
                B_stack[i, :r, :] = layer.lora_B[n].weight.t() * layer.scaling[n]
            biases = [layer.lora_B[n].bias for n in names]
            bias_stack = None
            if any(b is not None for b in biases):
                zero = A0.new_zeros(layer.out_features)
                bias_stack = torch.stack([b * layer.scaling[n] if b is not None else zero for n, b in zip(names, biases)])
        self._stack = Stacked(A_stack, B_stack, bias_stack)
        self._stack_key = (names, params, _fingerprint(params))
        return self._stack


def _fingerprint(params: list[Tensor]) -> tuple:
    """Changes when any of `params` is modified in place or given new storage."""
    return tuple((-1 if p.is_inference() else p._version, p.data_ptr()) for p in params)


@functools.lru_cache(maxsize=256)
def _group_plan(rows: tuple[str, ...], present: tuple[str, ...]) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Gather rows into one equal-size group per adapter in `present`.

    Returns `src` (groups * size,): the row each slot reads (short groups repeat their last row),
    and, in row order, every row that has an adapter (`dst_rows`) and its slot (`dst_slots`).
    `src` and `dst_slots` are None where they would be 0, 1, 2, … (rows already grouped evenly).
    """
    members = {name: [i for i, n in enumerate(rows) if n == name] for name in present}
    size = max(len(m) for m in members.values())
    src = [row for name in present for row in members[name] + [members[name][-1]] * (size - len(members[name]))]
    slot = {row: g * size + k for g, name in enumerate(present) for k, row in enumerate(members[name])}
    dst_rows = sorted(slot)
    dst_slots = [slot[row] for row in dst_rows]
    identity = src == list(range(len(rows)))
    as_index = functools.partial(torch.tensor, dtype=torch.long)
    return None if identity else as_index(src), as_index(dst_rows), None if identity else as_index(dst_slots)
