"""A run killed with SIGKILL and resumed from its latest checkpoint logs the uninterrupted run's losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_helpers import losses

from lorakit.train import TrainConfig, train

# The child slows each micro-batch so that the kill lands mid-run, between checkpoints.
CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    import lorakit.train.loop as loop
    real = loop.causal_lm_loss
    def slow(model, batch):
        time.sleep(0.15)
        return real(model, batch)
    loop.causal_lm_loss = slow
    from lorakit.train import load_train_config, train
    train(load_train_config(sys.argv[1]))
""")


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(s >= step for s in losses(metrics.parent)):
            return
        if process.poll() is not None:
            pytest.fail(f"the training process ended early:\n{process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"step {step} never showed up in {metrics}")


def test_sigkill_then_resume_matches_an_uninterrupted_run(base_config, tmp_path):
    # dropout > 0: the resumed run must also restore the torch RNG to match
    options = dict(base_config, max_steps=10, save_every=2, lora_dropout=0.1, eval_fraction=0.2, eval_every=3)
    killed = TrainConfig(**options)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(killed.to_yaml())
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out = Path(killed.output_dir)
    wait_for_step(out / "metrics.jsonl", 5, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    logged = losses(out)
    assert max(logged) < 10, "the run finished before it was killed"
    assert not (out / "adapter").exists()

    result = train(TrainConfig(**{**options, "resume": "latest"}))
    reference_dir = tmp_path / "reference"
    reference = train(TrainConfig(**{**options, "output_dir": str(reference_dir)}))

    resumed, expected = losses(out), losses(reference_dir)
    assert sorted(resumed) == list(range(1, 11))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    assert result.eval_loss == pytest.approx(reference.eval_loss, abs=1e-6)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
