"""The run directory: refusing to clobber a previous run, and directories that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def fsync_dir(path: Path) -> None:
    """Persist a rename inside `path` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it is renamed to `final` in one step.

    Readers see the old `final` (if any) or the complete new one, never a half-written one.
    On error, or if the process dies, only a `.tmp-*` sibling is left (see `clean_temp_dirs`).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        if final.exists():  # replace: move the old one aside first, since rename cannot replace a dir
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def clean_temp_dirs(parent: Path) -> None:
    """Remove `.tmp-*` leftovers of writes that a killed process never finished."""
    if parent.is_dir():
        for entry in parent.glob(".tmp-*"):
            remove(entry)
