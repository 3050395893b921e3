"""A tiny random Llama with a byte-level ChatML tokenizer, saved as a model dir, and chat data for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinymodels import CHATML, save_tiny_model, write_records  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", 24)


@pytest.fixture
def base_config(tiny_model: Path, train_file: Path, tmp_path: Path) -> dict:
    """Options for a fast run on the tiny model; tests override what they exercise."""
    return dict(model=str(tiny_model), data=str(train_file), output_dir=str(tmp_path / "run"),
                batch_size=4, max_seq_len=64, lr=1e-2, quiet=True, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train ~40x faster on one thread than on two busy-waiting ones on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
