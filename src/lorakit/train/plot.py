"""loss.png: train and eval loss against the step (matplotlib, imported only when plotting)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.lora.io import atomic_write_bytes


def plot_losses(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """Write the plot to `path` atomically; False (nothing written) without matplotlib or records."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    # a Figure with its own Agg canvas: no pyplot, so no global backend or window state
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True
