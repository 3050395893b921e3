"""LoRA wrappers around an existing layer (`base_layer`): Linear, transformers' Conv1D, Embedding.

Each wrapper keeps the frozen base layer untouched and holds any number of named adapters in
PEFT's layout (`lora_A[name]`, `lora_B[name]`, …), so `state_dict` keys read like PEFT's.
Which adapters run is decided per call by `routing.current_route()`, falling back to the
layer's own `active_adapters`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as LF
from ..fast import recompute
from ..fast.kernels import LoraWeightsBias, lora_linear
from .routing import BASE, Route, current_route


@functools.cache
def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return None
    return Conv1D


@functools.cache
def _plain_linear_types() -> tuple[type, ...]:
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


class LoraLayer(nn.Module):
    """What every LoRA wrapper shares: bookkeeping of named adapters, routing, merge state."""

    adapter_attrs: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._fast_names: dict[tuple, tuple | None] = {}  # (names, training) -> fast-path plan; see _fast_plan

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
        """Drop what was cached about this layer's adapters."""
        self._fast_names.clear()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        return weight.device, dtype

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
    def get_delta_weight(self, name: str) -> Tensor:
        raise NotImplementedError

    def _pending(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.r and n not in self.merged_adapters]

    def merged_weight(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """The base weight with adapter `name` merged in, plus what unmerging needs (DoRA's norm)."""
        return LF.merge(weight, self.get_delta_weight(name)), None

    def merge_is_finite(self, adapter_names: list[str] | None = None) -> bool:
        """Would merging these adapters give finite weights? Computed aside, the layer is untouched."""
        weight = self.base_layer.weight.data
        for name in self._pending(adapter_names):
            weight, _ = self.merged_weight(name, weight)
        return bool(torch.isfinite(weight).all())

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
        weight = self.base_layer.weight
        weight.data, _ = self.merged_weight(name, weight.data)

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data = LF.unmerge(weight.data, self.get_delta_weight(name))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.r)


class Linear(LoraLayer):
    """LoRA around a linear map: nn.Linear (W is (out, in)) or GPT-2's Conv1D (W is (in, out))."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.out_features, self.in_features = base_layer.weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norms: dict[str, Tensor] = {}
        self._mixed_cache: tuple | None = None  # see _stacked
        self._rows_cache: tuple | None = None  # see _row_plan
        self.__dict__["input_norm"] = None  # the norm whose output this layer reads, if known (lorakit.fast.recompute)

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        if use_dora and self.fan_in_fan_out:
            raise ValueError("use_dora=True is supported on nn.Linear layers only, not on transposed Conv1D")
        device, dtype = self._adapter_device_dtype()
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = LF.lora_scaling(lora_alpha, r, use_rslora)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._init_weights(name, init_lora_weights)
        if use_dora:
            with torch.no_grad():
                weight = self._weight_out_in().to(dtype)
                norm = LF.dora_weight_norm(weight, self.get_delta_weight(name).to(dtype))
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        super()._adapters_changed()
        self._mixed_cache = self._rows_cache = None

    def _init_weights(self, name: str, init: bool | str) -> None:
        if init is False:  # keep nn.Linear's random init for both A and B (useful in tests)
            return
        A, B = self.lora_A[name], self.lora_B[name]
        if A.weight.is_meta:
            return
        if init == "gaussian":
            nn.init.normal_(A.weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
        if B.bias is not None:
            nn.init.zeros_(B.bias)

    def _weight_out_in(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def uses_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def get_delta_weight(self, name: str) -> Tensor:
        return LF.delta_weight(
            self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.fan_in_fan_out
        )

    # -- merge (DoRA and lora_bias need more than W += dW) ------------------------------------
    def merged_weight(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.uses_dora(name):
            return super().merged_weight(name, weight)
        new, norm = LF.dora_merge(weight, self.get_delta_weight(name), self.lora_magnitude_vector[name].data)
        return new.to(weight.dtype), norm

    def _merge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.data, norm = self.merged_weight(name, weight.data)
        if norm is not None:
            self._dora_norms[name] = norm
        lora_bias = self.lora_B[name].bias
        if lora_bias is not None:
            base_bias = self.base_layer.bias
            if base_bias is None:
                raise ValueError(f"cannot merge lora_bias of adapter {name!r}: the base layer has no bias")
            base_bias.data = base_bias.data + lora_bias.data.to(base_bias.dtype) * self.scaling[name]

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        if self.uses_dora(name):
            norm = self._dora_norms.pop(name)
            weight.data = LF.dora_unmerge(
                weight.data, self.get_delta_weight(name), self.lora_magnitude_vector[name].data, norm
            ).to(weight.dtype)
        else:
            super()._unmerge_one(name)
        lora_bias = self.lora_B[name].bias
        if lora_bias is not None:
            base_bias = self.base_layer.bias
            base_bias.data = base_bias.data - lora_bias.data.to(base_bias.dtype) * self.scaling[name]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # decoding calls this ~200 times a token: the common case takes few Python steps
        rows, names = self._wanted()
        if rows is not None:
            return self._forward_mixed(x, rows, *args, **kwargs)
        if self.merged_adapters and self._check_merge_state(tuple(names)):
            return self.base_layer(x, *args, **kwargs)
        plan = None if args or kwargs else self._fast_plan(names)  # merged adapters returned or raised above
        if plan is not None:
            if not torch.is_grad_enabled():
                return lora_linear(x, *_plan_weights(plan))
            return lora_linear(x, *_plan_weights(plan), *recompute.source(self.input_norm, x))
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            if name in self.r:
                result = result + self._adapter_output(name, x, result).to(result.dtype)
        return result

    def fast_adapter(self) -> str | None:
        """The one adapter this call would run on the fused fast path, or None if it needs the general one."""
        plan = self._call_plan()
        return None if plan is None else plan[0]

    def fast_weights(self) -> LoraWeightsBias | None:
        """(W (out, in), bias, A, B, scaling) of the adapter this call would run on the fast path, or None."""
        plan = self._call_plan()
        return None if plan is None else _plan_weights(plan)

    def _call_plan(self) -> tuple | None:
        rows, names = self._wanted()
        return None if self.merged_adapters or rows is not None else self._fast_plan(names)

    def _fast_plan(self, names: Sequence[str]) -> tuple | None:
        """(adapter, base layer, its A and B modules, scaling, base weight transposed?) when `names`
        asks for one adapter the fused kernel covers, else None. Cached per (names, train/eval)
        until update_layer/delete_adapter change the layer; the tensors themselves are read at
        each call (see _plan_weights), so weights loaded or moved later are the ones used."""
        key = (tuple(names), self.training)
        if key not in self._fast_names:
            present = [n for n in names if n in self.r]
            plan = None
            if len(present) == 1 and self._fast_path_ok(present[0]):
                name = present[0]
                plan = (name, self.base_layer, self.lora_A[name], self.lora_B[name], self.scaling[name], self.fan_in_fan_out)
            self._fast_names[key] = plan
        return self._fast_names[key]

    def _fast_path_ok(self, name: str) -> bool:
        """The fused kernel covers plain LoRA on a plain nn.Linear/Conv1D without active dropout."""
        return (
            type(self.base_layer) in _plain_linear_types()
            and not self.uses_dora(name)
            and self.lora_B[name].bias is None
            and (not self.training or isinstance(self.lora_dropout[name], nn.Identity))
        )

    def _adapter_output(self, name: str, x: Tensor, base_result: Tensor) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(A.weight.dtype))
        lora = B(A(x))
        if not self.uses_dora(name):
            return lora * self.scaling[name]
        return self._dora_output(name, x, lora, base_result)

    def _dora_output(self, name: str, x: Tensor, lora: Tensor, base_result: Tensor) -> Tensor:
        """DoRA's extra term: (m/||W + dW|| - 1) * x W^T + (m/||W + dW||) * scaling * lora.

        The norm is detached, as the DoRA paper (sec. 4.3) and PEFT do, to save memory.
        """
        weight = self._weight_out_in().to(x.dtype)
        with torch.no_grad():
            norm = LF.dora_weight_norm(weight, self.get_delta_weight(name).to(x.dtype))
        factor = self.lora_magnitude_vector[name] / norm  # (out,)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = base_result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        else:  # PEFT's convention: with dropout active, the base term sees the dropped-out input
            base = F.linear(x, weight)
        return (factor - 1) * base + factor * lora * self.scaling[name]

    def _forward_mixed(self, x: Tensor, rows: tuple[str, ...], *args, **kwargs) -> Tensor:
        """One forward where batch row i uses adapter rows[i].

        The adapters present are stacked, (adapters, in, r_max) and (adapters, r_max, out) with
        ranks zero-padded and the scaling folded in. Rows are gathered into equal-size groups, one
        per adapter, and two batched matmuls compute every group's low-rank term at once: the
        work of one rank-r product per row, whatever the mix, and no loop over adapters.
        """
        if self.merged_adapters:
            raise ValueError("mixed-adapter batches cannot run while adapters are merged; unmerge first")
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows")
        if not args and not kwargs and type(self.base_layer) in _plain_linear_types():  # skip a module call
            result = F.linear(x, self._weight_out_in(), self.base_layer.bias)
        else:
            result = self.base_layer(x, *args, **kwargs)
        present, (src, dst_rows, dst_slots), stacked = self._row_plan(rows, x.device)
        if not present:
            return result
        A_stack, B_stack, bias_stack = stacked
        groups = len(present)
        xs = x.to(A_stack.dtype)
        xs = xs if src is None else xs.index_select(0, src)  # (groups * size, ..., in)
        delta = torch.bmm(xs.reshape(groups, -1, x.shape[-1]), A_stack)  # (groups, size * tokens, r_max)
        if src is None and bias_stack is None and result.dtype == delta.dtype:  # grouped rows: add in place
            result.view(groups, -1, result.shape[-1]).baddbmm_(delta, B_stack)
            return result
        delta = torch.bmm(delta, B_stack)  # (groups, size * tokens, out)
        if bias_stack is not None:
            delta = delta + bias_stack.unsqueeze(1)
        delta = delta.reshape(-1, *result.shape[1:])
        delta = (delta if dst_slots is None else delta.index_select(0, dst_slots)).to(result.dtype)
        if dst_rows.shape[0] == result.shape[0]:  # every row has an adapter (dst_rows is 0, 1, …)
            return result.add_(delta)
        return result.index_add_(0, dst_rows, delta)

    def _row_plan(self, rows: tuple[str, ...], device: torch.device) -> tuple[tuple[str, ...], tuple, tuple | None]:
        """This layer's adapters among `rows`, their `_group_plan` on `device` and their stacked
        weights. Kept for the same `rows` object, which one mixed `generate` passes to every layer
        at every step: the weights are checked once per call, not once per token."""
        cached = self._rows_cache
        if cached is not None and cached[0] is rows and cached[1] == device:
            return cached[2]
        present = tuple(sorted(n for n in set(rows) if n in self.r))
        if any(self.uses_dora(n) for n in present):
            raise ValueError("mixed-adapter batches support plain LoRA adapters (not DoRA)")
        plan, stacked = (None, None, None), None
        if present:
            plan = tuple(t.to(device) if t is not None else None for t in _group_plan(rows, present))
            stacked = self._stacked(present)
        self._rows_cache = (rows, device, (present, plan, stacked))
        return present, plan, stacked

    def _stacked(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Adapters stacked for batched matmuls, cached until an adapter's weights change.

        The check runs in every mixed forward of every layer, so it only compares the cached
        parameters' versions and storages (update_layer drops the cache when adapters change).
        """
        cache = self._mixed_cache
        if cache is not None and cache[0] == names and cache[2] == _fingerprint(cache[1]):
            return cache[3]
        params = [p for n in names for p in (self.lora_A[n].weight, self.lora_B[n].weight)]
        r_max = max(self.r[n] for n in names)
        A0 = self.lora_A[names[0]].weight
        with torch.no_grad():
            A_stack = A0.new_zeros(len(names), self.in_features, r_max)
            B_stack = A0.new_zeros(len(names), r_max, self.out_features)
            for i, n in enumerate(names):
                r = self.r[n]
                A_stack[i, :, :r] = self.lora_A[n].weight.t()
                B_stack[i, :r, :] = self.lora_B[n].weight.t() * self.scaling[n]
            biases = [self.lora_B[n].bias for n in names]
            bias_stack = None
            if any(b is not None for b in biases):
                bias_stack = torch.stack(
                    [b * self.scaling[n] if b is not None else A0.new_zeros(self.out_features) for n, b in zip(names, biases)]
                )
        value = (A_stack, B_stack, bias_stack)
        self._mixed_cache = (names, params, _fingerprint(params), value)
        return value


def _plan_weights(plan: tuple) -> LoraWeightsBias:
    """(W (out, in), bias, A, B, scaling) of a `_fast_plan`, read straight from the modules'
    parameter tables (Module.__getattr__ is a Python call; decoding does this ~200 times a token)."""
    _, base, A, B, scaling, transposed = plan
    weight = base._parameters["weight"]
    return (weight.T if transposed else weight), base._parameters.get("bias"), A._parameters["weight"], B._parameters["weight"], scaling


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


class Embedding(LoraLayer):
    """LoRA around nn.Embedding: the delta is a low-rank (num_embeddings, dim) table."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        if use_dora or lora_bias:
            raise ValueError("use_dora and lora_bias are supported on linear layers only, not nn.Embedding")
        device, dtype = self._adapter_device_dtype()
        num, dim = self.base_layer.weight.shape
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = LF.lora_scaling(lora_alpha, r, use_rslora)
        A = torch.empty(r, num, device=device, dtype=dtype)
        B = torch.empty(dim, r, device=device, dtype=dtype)
        if not A.is_meta:
            if init_lora_weights is False:
                nn.init.normal_(A), nn.init.normal_(B)
            elif init_lora_weights == "gaussian":
                nn.init.normal_(A), nn.init.zeros_(B)
            else:  # PEFT's default for embeddings: A zero, B normal
                nn.init.zeros_(A), nn.init.normal_(B)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def get_delta_weight(self, name: str) -> Tensor:
        return LF.embedding_delta_weight(
            self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]
        )

    def _lookup(self, x: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        rows, names = self._wanted()
        result = self.base_layer(x, *args, **kwargs)
        if rows is not None:
            if self.merged_adapters:
                raise ValueError("mixed-adapter batches cannot run while adapters are merged; unmerge first")
            for name in dict.fromkeys(rows):  # embeddings are cheap: group rows by adapter
                if name == BASE or name not in self.r:
                    continue
                mask = torch.tensor([n == name for n in rows], device=x.device)
                delta = self._delta(name, x[mask]).to(result.dtype)
                result = result.index_put((mask.nonzero().squeeze(1),), result[mask] + delta)
            return result
        if self._check_merge_state(tuple(names)):
            return result
        for name in names:
            if name in self.r:
                result = result + self._delta(name, x).to(result.dtype)
        return result

    def _delta(self, name: str, x: Tensor) -> Tensor:
        after_A = self._lookup(x, self.lora_embedding_A[name].T)  # (..., r)
        return (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy of a whole module per adapter (PEFT's `modules_to_save`), e.g. a new head."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []

    def add(self, name: str) -> None:
        import copy

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


def wrapper_for(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for a module type; a clear error for types LoRA cannot wrap."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return Linear(module, fan_in_fan_out=False)
    if conv1d is not None and isinstance(module, conv1d):
        return Linear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Embedding):
        return Embedding(module)
    raise TypeError(
        f"cannot add LoRA to a {type(module).__name__}: supported layers are torch.nn.Linear, "
        "torch.nn.Embedding and transformers' Conv1D"
    )


def is_adaptable(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, (nn.Linear, nn.Embedding)) or (conv1d is not None and isinstance(module, conv1d))
