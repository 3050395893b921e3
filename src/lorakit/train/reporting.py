"""Where a run's metrics go besides metrics.jsonl: TensorBoard event files and Weights & Biases.

Each reporter is one `REPORTERS` entry (its optional package and a class with `write(record)` and
`close()`); the packages are imported only when a run asks for them. Every reporter gets the
resolved config once (hyperparameters), then each logged record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def _missing(name: str, package: str) -> ImportError:
    return ImportError(f"report_to: {name} needs the {package} package: pip install 'lorakit[{name}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, the step and totals left out (they are the x axis)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "total_steps") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """Config values as TensorBoard hparams take them: numbers, strings and bools; others as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class TensorBoardReporter:
    """output_dir/tensorboard: one scalar per metric, the hyperparameters and the config as text.

    The writer opens at the first record with purge_step at that step, so a resumed run replaces
    the steps it logs again instead of drawing them twice.
    """

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self._open = lambda step: SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=step)
        self._config = config
        self._writer = None

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if self._writer is None:
            from torch.utils.tensorboard.summary import hparams

            self._writer = self._open(step)
            for summary in hparams(flat_hparams(self._config), {}):
                self._writer.file_writer.add_summary(summary)
            self._writer.add_text("config", "```yaml\n" + yaml.safe_dump(self._config, sort_keys=False) + "```", step)
        for key, value in scalars(record).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbReporter:
    """A W&B run in output_dir/wandb, offline unless the user set WANDB_MODE (sync later: wandb sync)."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        out.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=out.name,
                               dir=str(out), config=config)

    def write(self, record: dict[str, Any]) -> None:
        self._run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


@dataclass(frozen=True)
class Reporter:
    package: str  # the optional import it needs (checked by TrainConfig without importing it)
    cls: type


REPORTERS: dict[str, Reporter] = {
    "tensorboard": Reporter("tensorboard", TensorBoardReporter),
    "wandb": Reporter("wandb", WandbReporter),
}


def open_reporters(names: list[str], out: Path, config: dict[str, Any]) -> list[Any]:
    """One reporter per name; if one fails to start, those already open are closed."""
    opened: list[Any] = []
    try:
        for name in names:
            opened.append(REPORTERS[name].cls(out, config))
    except BaseException:
        for reporter in opened:
            reporter.close()
        raise
    return opened
