"""Packing short examples into rows of ``max_seq_len`` without attention between them.

Each packed row carries ``position_ids`` that restart at 0 for every example. With
transformers' models (5.x ``masking_utils.find_packed_sequence_indices``) a position
that does not follow its predecessor starts a new sequence, and the causal mask is
cut there: exact isolation on the sdpa, eager, flex and flash paths alike, with no
quadratic mask to build. Two conditions, both on the caller: pass no
``attention_mask`` (``collate`` leaves it out for packed rows) and no KV cache —
call the model with ``use_cache=False``, or the detection is skipped.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from lorakit.data.tokenize import IGNORE, Example


def pack(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Best-fit-decreasing packing: few rows, deterministic for a given input order."""
    bins: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        if size > max_seq_len:
            raise ValueError(f"an example of {size} tokens does not fit max_seq_len={max_seq_len}")
        slot = bisect.bisect_left(free, (size, -1))  # the tightest bin with room
        if slot == len(free):
            bins.append([example])
            room, index = max_seq_len - size, len(bins) - 1
        else:
            room, index = free.pop(slot)
            bins[index].append(example)
            room -= size
        bisect.insort(free, (room, index))
    return [_join(row) for row in bins]


def _join(row: list[Example]) -> Example:
    input_ids, labels, position_ids = [], [], []
    for example in row:
        input_ids += example.input_ids
        # the first token of an example must not be the target of the previous one's last
        labels += [IGNORE] + example.labels[1:]
        position_ids += range(len(example.input_ids))
    return Example(input_ids, labels, position_ids)
