"""Shared pieces of the distributed tests: a tiny model and data, torchrun command lines, reading runs.

Every multi-process run here is `torchrun` on 127.0.0.1 with the gloo backend, one thread per
process (the machine has 2 cores), and compares with one process training the same data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tinymodels import CHATML, write_records  # noqa: F401
from tinymodels import save_tiny_model as _save_tiny_model

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def save_tiny_model(out: Path) -> Path:
    """The shared tiny model, with the head tied to the embeddings like SmolLM2 (one parameter FSDP
    must gather once)."""
    return _save_tiny_model(out, tie_word_embeddings=True)


# 17 training records at a global batch of 4: the 5th step of each epoch holds one example, so
# rank 1 has none and must run a weightless filler batch to keep the collectives in step.
N_TRAIN, N_EVAL = 17, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """One thread per process, passive OpenMP waiting, gloo on the loopback interface."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "TQDM_DISABLE": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(nproc: int, port: int, *, nnodes: int = 1, node_rank: int = 0, run_id: str = "lorakit-test") -> list[str]:
    """A torchrun command line with c10d rendezvous on 127.0.0.1:`port` (the same for every node)."""
    return [*TORCHRUN, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--node-rank={node_rank}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            "--local-addr=127.0.0.1", "--max-restarts=0"]


def run(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env(**env))
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged train loss; a step logged twice would be a second writer: refused."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{run_dir}: steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def eval_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two safetensors files with the same keys."""
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb), f"{a} and {b} hold different tensors"
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def assert_same_run(run_dir: Path, reference: Path, steps: range, tol: float = 5e-5,
                    weights: str = "adapter/adapter_model.safetensors") -> None:
    """Per-step losses and the final adapter (or `weights`) of `run_dir` equal the reference's within `tol`.

    Gradients of a batch split over processes differ from the whole batch's by rounding (~1e-9);
    Adam's first steps (g / sqrt(g^2), lr 1e-2 here) magnify that to ~2e-5 in the weights.
    """
    got, expected = losses(run_dir), losses(reference)
    assert sorted(got) == list(steps), f"{run_dir}: logged steps {sorted(got)}"
    for step in steps:
        assert abs(got[step] - expected[step]) < tol, f"step {step}: {got[step]} vs {expected[step]}"
    difference = max_difference(run_dir / weights, reference / weights)
    assert difference < tol, f"{run_dir}: final weights differ by {difference:.2e} (tolerance {tol:.0e})"
