"""Helpers for the trainer tests (a uniquely named module: `conftest` names several files in this suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged train loss, from a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl") as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}


def poison_loss(monkeypatch, from_call: int) -> None:
    """Make the trainer's loss NaN from its `from_call`-th call on (a run that diverges there)."""
    from lorakit.train import loop as train_loop

    calls = []
    real = train_loop.causal_lm_loss

    def poisoned(model, batch):
        calls.append(1)
        loss, n = real(model, batch)
        return (loss * float("nan") if len(calls) >= from_call else loss), n

    monkeypatch.setattr(train_loop, "causal_lm_loss", poisoned)


def assert_resumes_as_uninterrupted(config: dict, reference_dir: Path) -> None:
    """Resume the interrupted run of `config` (resume=latest), then run it whole in `reference_dir`:
    the logged losses agree at every step, 1 to max_steps (within 1e-6)."""
    from lorakit.train import TrainConfig, train

    train(TrainConfig(**config, resume="latest"))
    train(TrainConfig(**dict(config, output_dir=str(reference_dir))))
    resumed, expected = losses(Path(config["output_dir"])), losses(reference_dir)
    assert resumed.keys() == expected.keys() == set(range(1, config["max_steps"] + 1))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
