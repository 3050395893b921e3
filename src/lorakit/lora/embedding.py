"""LoRA around nn.Embedding: the low-rank term is a lookup in A followed by a product with B."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as LF
from .layer import LoraLayer
from .routing import BASE


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
        autocast_adapter_dtype: bool = True,
    ) -> None:
        if use_dora or lora_bias:
            raise ValueError("use_dora and lora_bias are supported on linear layers only, not nn.Embedding")
        device, dtype = self._adapter_device_dtype(autocast_adapter_dtype)
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

    _delta = get_delta_weight

    def _weight(self) -> Tensor:
        return self.base_layer.weight.data

    def _store(self, weight: Tensor) -> None:
        self.base_layer.weight.data = weight

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
                delta = self._lookup_delta(name, x[mask]).to(result.dtype)
                result = result.index_put((mask.nonzero().squeeze(1),), result[mask] + delta)
            return result
        if self._check_merge_state(tuple(names)):
            return result
        for name in names:
            if name in self.r:
                result = result + self._lookup_delta(name, x).to(result.dtype)
        return result

    def _lookup_delta(self, name: str, x: Tensor) -> Tensor:
        after_A = self._lookup(x, self.lora_embedding_A[name].T)  # (..., r)
        return (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]
