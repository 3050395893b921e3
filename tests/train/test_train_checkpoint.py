"""Checkpoint pieces: optimizer and RNG state through safetensors/JSON, atomic directories, pruning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lorakit.train.checkpoint import (find_checkpoints, flatten_optimizer, latest_checkpoint, load_checkpoint,
                                      save_checkpoint, unflatten_optimizer)
from lorakit.lora.io import atomic_dir


def trained_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = list(model.named_parameters())
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, params, optimizer


def test_optimizer_state_round_trip():
    _, _, optimizer = trained_optimizer()
    tensors, meta = flatten_optimizer(optimizer.state_dict())
    assert set(tensors) >= {"state.0.exp_avg", "state.0.exp_avg_sq", "state.3.step"}
    import json

    restored = unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    original = optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == original["param_groups"][0]["lr"]
    for index, entry in original["state"].items():
        for name, value in entry.items():
            assert torch.equal(restored["state"][index][name], value)


def test_checkpoint_resumes_optimizer_and_rngs_exactly(tmp_path):
    model, params, optimizer = trained_optimizer()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    path = save_checkpoint(tmp_path, 3, params, optimizer, {"epoch": 0}, "lr: 0.01\n", keep=2)
    expected = (torch.rand(3), random.random(), np.random.rand(), )
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    optimizer.step()
    after_one_more = [p.detach().clone() for _, p in params]

    model2, params2, optimizer2 = trained_optimizer(seed=1)  # different weights and moments
    checkpoint = load_checkpoint(path, params2, optimizer2)
    assert checkpoint.step == 3 and checkpoint.state["epoch"] == 0 and checkpoint.config == "lr: 0.01\n"
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    model2(x).pow(2).sum().backward()
    optimizer2.step()
    for a, b in zip(after_one_more, (p for _, p in params2)):
        assert torch.equal(a, b)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _, params, optimizer = trained_optimizer()
    path = save_checkpoint(tmp_path, 1, params, optimizer, {}, "", keep=1)
    other = torch.nn.Linear(4, 3)
    named = list(other.named_parameters())
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(path, named, torch.optim.AdamW(other.parameters()))


def test_keeps_the_newest_k_and_latest_is_highest_step(tmp_path):
    _, params, optimizer = trained_optimizer()
    for step in (2, 4, 10, 6):
        save_checkpoint(tmp_path, step, params, optimizer, {}, "", keep=2)
    assert [s for s, _ in find_checkpoints(tmp_path)] == [6, 10]
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_atomic_dir_leaves_nothing_on_error_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_incomplete_or_temp_dirs_are_not_checkpoints(tmp_path):
    (tmp_path / "step-9").mkdir()  # no files: a torn copy, not ours
    (tmp_path / ".tmp-step-12-x").mkdir()
    assert latest_checkpoint(tmp_path) is None
