"""Fixtures of the distributed tests: the tiny model, the data, a YAML recipe and one process's run of it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from dist_helpers import N_EVAL, N_TRAIN, save_tiny_model, write_records

# What every run here shares; runs differ in batch_size, grad_accum, processes and strategy only.
# lora_dropout stays 0: runs with different numbers of processes draw different dropout masks.
RECIPE = dict(max_seq_len=64, lr=1e-2, max_steps=8, save_every=4, eval_every=4, quiet=True, seed=0,
              lora_dropout=0.0, dist_timeout=60)


@pytest.fixture(scope="session")
def dist_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model dir, train and eval data, and recipe.yaml (no batch_size, output_dir or distributed)."""
    root = tmp_path_factory.mktemp("dist")
    files = {"model": save_tiny_model(root / "tiny-model"),
             "data": write_records(root / "train.jsonl", N_TRAIN, seed=0),
             "eval_data": write_records(root / "eval.jsonl", N_EVAL, seed=1)}
    recipe = {**RECIPE, **{k: str(v) for k, v in files.items()}}
    files["recipe"] = root / "recipe.yaml"
    files["recipe"].write_text(yaml.safe_dump(recipe))
    return files


@pytest.fixture(scope="session")
def one_process(dist_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """one_process("k=v", …) -> the run dir of the recipe trained by this process, batch_size 4 (cached)."""
    from lorakit.train import load_train_config, train

    runs: dict[tuple[str, ...], Path] = {}

    def run(*overrides: str) -> Path:
        if overrides not in runs:
            out = tmp_path_factory.mktemp("one-process") / "run"
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(load_train_config(dist_files["recipe"], ["batch_size=4", f"output_dir={out}", *overrides]))
            finally:
                torch.set_num_threads(before)
            runs[overrides] = out
        return runs[overrides]

    return run


@pytest.fixture(scope="session")
def reference(one_process: Callable[..., Path]) -> Path:
    """One process, batch_size 4, LoRA: the run every multi-process run here must reproduce."""
    return one_process()
