"""LoRA around a linear base, whatever its kind (`bases.FrozenBase`): dense, transposed, 16-bit.

The common case, one plain adapter without active dropout on a fast base, runs the fused
kernel (`fast.kernels.lora_linear`); everything else (several adapters, DoRA, lora_bias,
dropout in training, a base subclass, extra call arguments) the general path: the base's
product plus each adapter's term. Mixed-batch rows are `lora.mixed`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bases import FrozenBase, frozen_base
from ..fast import recompute
from ..fast.kernels import Adapted, lora_linear
from . import functional as LF
from .layer import LoraLayer
from .mixed import MixedRows


@dataclass(frozen=True)
class FastPlan:
    """The one adapter a call runs on the fused kernel. Kept per (adapters, train/eval) until the
    adapters change; the tensors are read at each call, so weights loaded or moved later count."""

    name: str
    base: FrozenBase
    A: nn.Linear
    B: nn.Linear
    scaling: float

    def adapted(self) -> Adapted:
        # straight from the parameter tables: Module.__getattr__ is a Python call, and decoding
        # does this ~200 times a token
        return Adapted(self.base, self.A._parameters["weight"], self.B._parameters["weight"], self.scaling)


class Linear(LoraLayer):
    """LoRA around a linear map. `fan_in_fan_out` (PEFT's name) says the module stores W as
    (in, out); PEFT-facing results (`get_delta_weight`) follow that layout, the math (out, in)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, base: FrozenBase) -> None:
        super().__init__(base_layer)
        self.__dict__["base"] = base  # a plain attribute: it refers to base_layer, no second submodule
        self.fan_in_fan_out = base.transposed
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norms: dict[str, Tensor] = {}
        self._plans: dict[tuple, FastPlan | None] = {}  # (names, training) -> plan; see fast_plan
        self.mixed = MixedRows(self)
        self.__dict__["input_norm"] = None  # the norm whose output this layer reads, if known (fast.recompute)

    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        return self.base.device, self.base.dtype

    def replace_base(self, module: nn.Module) -> None:
        """Put `module` under the adapters in place of the base layer (a de-quantized copy of a
        4-bit base for `merge_and_unload`, or the 4-bit layer made from the merged weights)."""
        base = frozen_base(module)
        if base is None or (base.in_features, base.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"cannot put {type(module).__name__} under a LoRA layer of shape "
                             f"({self.out_features}, {self.in_features})")
        self.base_layer = module
        self.__dict__["base"] = base
        self.fan_in_fan_out = base.transposed
        self._adapters_changed()

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
        autocast_adapter_dtype: bool = True,
    ) -> None:
        if use_dora and self.fan_in_fan_out:
            raise ValueError("use_dora=True is supported on nn.Linear layers only, not on transposed Conv1D")
        device, dtype = self._adapter_device_dtype(autocast_adapter_dtype)
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = LF.lora_scaling(lora_alpha, r, use_rslora)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._init_weights(name, init_lora_weights)
        if use_dora:
            with torch.no_grad():
                weight = self._weight().to(dtype)
                norm = LF.dora_weight_norm(weight, self._delta(name).to(dtype))
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        self._plans.clear()
        self.mixed.clear()

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

    def uses_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def get_delta_weight(self, name: str) -> Tensor:
        """PEFT's delta: laid out like the module's own weight ((in, out) when fan_in_fan_out)."""
        return LF.delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.fan_in_fan_out)

    def _delta(self, name: str) -> Tensor:
        return LF.delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def check_mergeable(self) -> None:
        if not self.base.mergeable:
            self.base.assign(self.base.dense())  # the base's own refusal, before anything is merged

    def _weight(self) -> Tensor:
        return self.base.dense()

    def _store(self, weight: Tensor) -> None:
        self.base.assign(weight)

    # -- merge (DoRA and lora_bias need more than W += dW) ------------------------------------
    def merged_weight(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.uses_dora(name):
            return super().merged_weight(name, weight)
        wide = torch.promote_types(weight.dtype, torch.float32)
        new, norm = LF.dora_merge(weight.to(wide), self._delta(name), self.lora_magnitude_vector[name].data)
        return new.to(weight.dtype), norm

    def _merge_one(self, name: str) -> None:
        new, norm = self.merged_weight(name, self._weight())
        if self.lora_B[name].bias is not None and self.base.bias is None:
            raise ValueError(f"cannot merge lora_bias of adapter {name!r}: the base layer has no bias")
        self._store(new)
        if norm is not None:
            self._dora_norms[name] = norm
        self._shift_bias(name, +1)

    def _unmerge_one(self, name: str) -> None:
        if self.uses_dora(name):
            norm = self._dora_norms.pop(name)
            weight = self._weight()
            wide = torch.promote_types(weight.dtype, torch.float32)
            self._store(LF.dora_unmerge(weight.to(wide), self._delta(name), self.lora_magnitude_vector[name].data, norm))
        else:
            super()._unmerge_one(name)
        self._shift_bias(name, -1)

    def _shift_bias(self, name: str, sign: int) -> None:
        lora_bias = self.lora_B[name].bias
        if lora_bias is not None:
            base_bias = self.base.bias
            base_bias.data = base_bias.data + sign * lora_bias.data.to(base_bias.dtype) * self.scaling[name]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # decoding calls this ~200 times a token: the common case takes few Python steps
        rows, names = self._wanted()
        if rows is not None:
            if self.merged_adapters:
                raise ValueError("mixed-adapter batches cannot run while adapters are merged; unmerge first")
            return self.mixed.forward(x, rows, self._base_output(x, args, kwargs))
        if self.merged_adapters and self._check_merge_state(tuple(names)):
            return self.base_layer(x, *args, **kwargs)
        plan = None if args or kwargs else self.fast_plan(names)  # merged adapters returned or raised above
        if plan is not None:
            keep = recompute.source(self.input_norm, x) if torch.is_grad_enabled() else None
            return lora_linear(x, plan.adapted(), keep)
        result = self._base_output(x, args, kwargs)
        for name in names:
            if name in self.r:
                result = result + self._adapter_output(name, x, result).to(result.dtype)
        return result

    def _base_output(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The base's product, through the seam when it can (skips a module call, and a 16-bit
        base multiplies in its compute dtype)."""
        if args or kwargs or not self.base.fast:
            return self.base_layer(x, *args, **kwargs)
        return self.base.linear(x)

    def call_plan(self) -> FastPlan | None:
        """The fast-path plan of a call made now (routing and merge state included), or None."""
        rows, names = self._wanted()
        return None if self.merged_adapters or rows is not None else self.fast_plan(names)

    def fast_plan(self, names: Sequence[str]) -> FastPlan | None:
        """The plan when `names` asks for one adapter the fused kernel covers, else None."""
        key = (tuple(names), self.training)
        if key not in self._plans:
            present = [n for n in names if n in self.r]
            plan = None
            if len(present) == 1 and self._fast_path_ok(present[0]):
                name = present[0]
                plan = FastPlan(name, self.base, self.lora_A[name], self.lora_B[name], self.scaling[name])
            self._plans[key] = plan
        plan = self._plans[key]
        # a base weight made trainable after the plan was cached takes the general path
        return plan if plan is None or self.base.frozen else None

    def _fast_path_ok(self, name: str) -> bool:
        """The fused kernel covers plain LoRA on a fast, frozen base without a trained bias or
        active dropout."""
        bias = self.base.bias
        return (
            self.base.fast
            and not self.uses_dora(name)
            and self.lora_B[name].bias is None
            and (bias is None or not bias.requires_grad)
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
        weight = self._weight().to(x.dtype)
        with torch.no_grad():
            norm = LF.dora_weight_norm(weight, self._delta(name).to(x.dtype))
        factor = self.lora_magnitude_vector[name] / norm  # (out,)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = self.base.bias
            base = base_result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        else:  # PEFT's convention: with dropout active, the base term sees the dropped-out input
            base = F.linear(x, weight)
        return (factor - 1) * base + factor * lora * self.scaling[name]
