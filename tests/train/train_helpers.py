"""Helpers for the trainer tests (a uniquely named module: `conftest` names several files in this suite)."""

from __future__ import annotations

import json
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged train loss, from a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl") as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh)}
