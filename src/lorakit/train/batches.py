"""Which examples form optimizer step s: a pure function of (seed, epoch, step, world size, rank).

Nothing here holds iterator state, so a resumed run (or another rank) computes the same
batches from the step number alone. Each epoch is a fresh seeded permutation; a step takes the
next `global_batch` indices of it; rank `r` of `world` takes every `world`-th of those; the
rank's share is cut into micro-batches of `batch_size`. The last step of an epoch may be short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lorakit.data import IGNORE, Example


@lru_cache(maxsize=4)
def epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The example order of one epoch; (seed, epoch) seeds it, so every epoch differs."""
    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_examples))


@dataclass(frozen=True)
class StepPlan:
    n_examples: int
    batch_size: int  # per micro-batch, per rank
    grad_accum: int = 1
    seed: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.n_examples < 1:
            raise ValueError("no training examples")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.global_batch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step within the epoch) of 0-based optimizer step `step`."""
        return divmod(step, self.steps_per_epoch)

    def step_indices(self, step: int) -> list[int]:
        """Every example of the step, all ranks together (what the loss is normalised over)."""
        epoch, index = self.position(step)
        order = epoch_order(self.n_examples, self.seed, epoch)
        return list(order[index * self.global_batch : (index + 1) * self.global_batch])

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """This rank's micro-batches of the step (fewer, or a short last one, at an epoch's end)."""
        mine = self.step_indices(step)[rank :: self.world_size]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]


def count_targets(examples: Sequence[Example]) -> int:
    """Tokens that get a loss: labels after the first position (which nothing predicts)."""
    return sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)


def count_tokens(examples: Sequence[Example]) -> int:
    return sum(len(e.input_ids) for e in examples)
