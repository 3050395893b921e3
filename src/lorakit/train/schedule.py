"""Learning-rate schedules as pure functions of the step, so a resumed run recomputes them exactly.

The shapes are transformers' `get_{cosine,linear,constant}_schedule_with_warmup` (the step
with index s uses lr(s); warmup starts at 0), so runs compare one-to-one with TRL's.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, kind: str = "cosine") -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index `step`."""
    if kind not in SCHEDULES:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warmup length in steps: given directly, or as a ratio of the run (rounded up, as HF does)."""
    return warmup_steps if warmup_steps else math.ceil(warmup_ratio * total_steps)
