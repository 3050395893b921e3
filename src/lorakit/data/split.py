"""A deterministic train/eval split of records."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_records(
    records: Sequence[T], eval_fraction: float, seed: int = 0
) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded random ``eval_fraction`` of records held out, order kept.

    At least one eval record when the fraction is positive, and at least one train record.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0 if eval_fraction == 0 else max(1, round(len(records) * eval_fraction))
    if n_eval and n_eval >= len(records):
        raise ValueError(f"cannot hold out {eval_fraction:.0%} of {len(records)} records "
                         "and keep any for training")
    held = set(random.Random(seed).sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]
