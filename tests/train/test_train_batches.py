"""Which examples form each step: a pure function of (seed, epoch, step, world size, rank)."""

from __future__ import annotations

import pytest

from lorakit.data import IGNORE, Example
from lorakit.train.batches import StepPlan, count_targets, epoch_order


def test_each_epoch_is_a_permutation_and_epochs_differ():
    plan = StepPlan(n_examples=10, batch_size=2, grad_accum=2, seed=3)
    assert plan.steps_per_epoch == 3  # 4 + 4 + 2
    for epoch in range(3):
        steps = range(epoch * 3, epoch * 3 + 3)
        seen = [i for s in steps for i in plan.step_indices(s)]
        assert sorted(seen) == list(range(10))
    assert plan.step_indices(0) != plan.step_indices(3)
    assert plan.position(4) == (1, 1)


def test_pure_function_of_seed():
    a, b = StepPlan(50, 4, seed=1), StepPlan(50, 4, seed=1)
    assert [a.step_indices(s) for s in range(30)] == [b.step_indices(s) for s in range(30)]
    assert StepPlan(50, 4, seed=2).step_indices(0) != a.step_indices(0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 0, 1)  # seed and epoch do not just add up


def test_split_into_micro_batches_keeps_the_step():
    whole, split = StepPlan(10, 4, grad_accum=1, seed=0), StepPlan(10, 2, grad_accum=2, seed=0)
    for step in range(6):
        assert whole.step_indices(step) == split.step_indices(step)
        assert sum(split.micro_batches(step), []) == whole.micro_batches(step)[0]
    assert split.micro_batches(2) == [split.step_indices(2)]  # the short last step: one micro-batch of 2


def test_ranks_share_a_step_disjointly():
    plan = StepPlan(20, batch_size=2, grad_accum=2, seed=0, world_size=2)
    for step in range(plan.steps_per_epoch):
        shares = [sum(plan.micro_batches(step, rank), []) for rank in range(2)]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == sorted(plan.step_indices(step))


def test_count_targets_skips_the_first_position():
    examples = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([1, 2], [5, IGNORE])]
    assert count_targets(examples) == 2


def test_empty_plan_is_refused():
    with pytest.raises(ValueError, match="no training examples"):
        StepPlan(0, 4)
