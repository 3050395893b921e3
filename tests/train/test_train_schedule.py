"""The learning-rate schedules, checked against transformers' own schedulers step by step."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.train import lr_factor, warmup_steps_for


def hf_factors(kind: str, total: int, warmup: int) -> list[float]:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    elif kind == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total,warmup", [(10, 0), (25, 5), (7, 7), (1, 0)])
def test_matches_transformers(kind, total, warmup):
    ours = [lr_factor(s, total, warmup, kind) for s in range(total)]
    assert ours == pytest.approx(hf_factors(kind, total, warmup), abs=1e-12)


def test_hand_values():
    # warmup 4 of 12: 0, 1/4, 2/4, 3/4, then cosine from 1 down over the remaining 8
    assert [lr_factor(s, 12, 4, "cosine") for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, 12, 4, "cosine") == pytest.approx(0.5)  # half-way: cos(pi/2)
    assert lr_factor(8, 12, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(11, 12, 4, "linear") == pytest.approx(1 / 8)
    assert lr_factor(11, 12, 4, "constant") == 1.0
    assert lr_factor(12, 12, 0, "cosine") == pytest.approx(0.0)


def test_warmup_from_ratio_rounds_up():
    assert warmup_steps_for(100, warmup_ratio=0.03) == 3
    assert warmup_steps_for(10, warmup_ratio=0.01) == 1
    assert warmup_steps_for(10, warmup_steps=4) == 4
    assert warmup_steps_for(10) == 0


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="'cosin'"):
        lr_factor(0, 10, 0, "cosin")


def test_factor_never_negative_or_nan():
    for kind in ("cosine", "linear", "constant"):
        for s in range(30):
            f = lr_factor(s, 20, 3, kind)  # steps past the end too
            assert 0.0 <= f <= 1.0 and not math.isnan(f)
