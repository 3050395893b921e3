"""Shared test setup: few threads (the machine has 2 cores), deterministic inputs."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads slow a shared 2-core machine down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
