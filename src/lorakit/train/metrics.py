"""metrics.jsonl (one JSON object per logged step) and what the user sees while training runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from lorakit.lora.io import atomic_write_bytes


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics file; a torn last line (the process was killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def keep_until(path: Path, step: int) -> None:
    """Drop records after `step`: a resumed run logs those steps again."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


class MetricsLog:
    """Appends records as they come, flushed so a killed run keeps what it logged, and hands each
    to the run's reporters (`report_to`: TensorBoard, W&B; see train.reporting)."""

    def __init__(self, path: Path | None, report_to: list[str] = (), config: dict[str, Any] | None = None) -> None:
        from .reporting import open_reporters

        self._reporters = open_reporters(list(report_to), path.parent, config or {}) if path is not None else []
        self._file: TextIO | None = open(path, "a") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for reporter in self._reporters:
            reporter.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for reporter in self._reporters:
            reporter.close()
        self._reporters = []


def format_record(record: dict[str, Any]) -> str:
    """One plain log line, e.g. `step 10/80 | loss 1.2345 | lr 2.00e-04 | 1520 tok/s | grad 0.81`."""
    parts = [f"step {record['step']}/{record['total_steps']}", f"loss {record['loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if record.get("grad_norm") is not None:
        parts.append(f"grad {record['grad_norm']:.3g}")
    return " | ".join(parts)


class Progress:
    """A tqdm bar (loss, lr, tokens/s, ETA), or plain lines with `quiet`; silent on non-main ranks."""

    def __init__(self, total: int, initial: int, quiet: bool, enabled: bool = True) -> None:
        self.quiet, self.enabled = quiet, enabled
        self._bar = None
        if enabled and not quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, steps: int, record: dict[str, Any] | None) -> None:
        """`steps` more steps are done; `record` is the logged record, if one was."""
        if self._bar is not None:
            if record is not None:
                self._bar.set_postfix(
                    loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False,
                )
            self._bar.update(steps)
        elif self.enabled and record is not None:
            print(format_record(record), flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
