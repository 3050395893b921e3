"""The per-layer view: LoRA parameters of one linear layer at several ranks, as the seed tabulates."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankRow:
    rank: int
    params: int
    percent: float  # of the layer's own weight


@dataclass(frozen=True)
class RankTable:
    in_features: int
    out_features: int
    layer_params: int
    rows: tuple[RankRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankTable":
        return cls(**{**data, "rows": tuple(RankRow(**row) for row in data["rows"])})


def parse_layer(text: str) -> tuple[int, int]:
    """'4096x4096' -> (in_features, out_features)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not match or 0 in (int(match.group(1)), int(match.group(2))):
        raise ValueError(f"--layer must be IN_FEATURESxOUT_FEATURES with positive sizes, e.g. 4096x4096; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_ranks(text: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16]; each must be a positive whole number."""
    ranks = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) <= 0:
            raise ValueError(f"--ranks must be positive whole numbers separated by commas, got {text!r}")
        ranks.append(int(part))
    return ranks


def rank_table(in_features: int, out_features: int, ranks: Iterable[int]) -> RankTable:
    """LoRA parameters of an `in_features` -> `out_features` linear layer, counted on the engine's
    own wrapper (on the meta device, so any size costs nothing)."""
    import torch
    from torch import nn

    from lorakit.lora.layers import wrapper_for

    layer_params = in_features * out_features
    rows = []
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"--ranks must be positive whole numbers, got {rank!r}")
        wrapper = wrapper_for("layer", nn.Linear(in_features, out_features, bias=False, device=torch.device("meta")))
        wrapper.update_layer("default", r=rank, lora_alpha=rank)
        params = sum(p.numel() for p in wrapper.adapter_parameters("default"))
        rows.append(RankRow(rank, params, 100 * params / layer_params))
    return RankTable(in_features, out_features, layer_params, tuple(rows))
