"""Batching examples into padded tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.data.tokenize import IGNORE, Example


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is never attended to or trained on.

    Unpacked: ``input_ids``, ``attention_mask``, ``labels``. Packed (examples with
    ``position_ids``): ``input_ids``, ``position_ids``, ``labels`` and deliberately no
    ``attention_mask``, since transformers isolates packed sequences only when none is
    given (call the model with ``use_cache=False`` too; see ``packing``). Padding then
    gets its own positions from 0, making it one more sequence nothing else sees.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    packed = [e.position_ids is not None for e in batch]
    if any(packed) and not all(packed):
        raise ValueError("cannot mix packed and unpacked examples in one batch")
    width = max(len(e.input_ids) for e in batch)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    out = {
        "input_ids": pad([e.input_ids for e in batch], pad_id),
        "labels": pad([e.labels for e in batch], IGNORE),
    }
    if all(packed):
        out["position_ids"] = torch.tensor(
            [e.position_ids + list(range(width - len(e.position_ids))) for e in batch],
            dtype=torch.long,
        )
    else:
        out["attention_mask"] = pad([[1] * len(e.input_ids) for e in batch], 0)
    return out


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS (padding is masked, so any id is safe)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an EOS token; pass pad_id explicitly")
