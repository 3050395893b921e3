"""The run directory: refusing to clobber a previous run, and cleaning up after killed writes
(directories that appear whole or not at all are `lora.io.atomic_dir`)."""

from __future__ import annotations

import shutil
from pathlib import Path

# What a run writes into output_dir; `overwrite` removes exactly these, nothing the user put there.
RUN_FILES = ("checkpoints", "adapter", "model", "metrics.jsonl", "loss.png", "config.yaml")


def check_output_dir(out: Path, *, overwrite: bool, resuming: bool) -> None:
    """Refuse a non-empty `out` unless the run resumes or may overwrite it (nothing is touched)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resuming or overwrite):
        raise FileExistsError(
            f"output_dir {out} is not empty; pass overwrite=true to replace its run files, "
            "resume=latest to continue it, or choose another output_dir"
        )


def prepare_output_dir(out: Path, *, overwrite: bool, resuming: bool) -> None:
    """Create `out`; with `overwrite` (and no resume) first remove a previous run's files."""
    check_output_dir(out, overwrite=overwrite, resuming=resuming)
    if overwrite and not resuming:
        for name in RUN_FILES:
            remove(out / name)
    out.mkdir(parents=True, exist_ok=True)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_temp_dirs(parent: Path) -> None:
    """Remove `.tmp-*` leftovers of writes that a killed process never finished."""
    if parent.is_dir():
        for entry in parent.glob(".tmp-*"):
            remove(entry)
