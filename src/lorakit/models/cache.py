"""Where lorakit keeps converted models, and how a directory gets there atomically.

A cache entry is trusted by existence alone, so it must never exist half-written:
it is built in a temp dir beside its final place and renamed into place in one step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STALE_TMP_SECONDS = 24 * 3600  # temp dirs older than this are leftovers of crashed builds


def cache_dir() -> Path:
    """lorakit's cache root: `$LORAKIT_CACHE`, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorakit"


def build_dir_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first filling it with `build(tmp_dir)` if it does not exist yet.

    A crash inside `build` leaves only a `.tmp-` sibling (never `final`); when two
    processes race, the first rename wins and the loser discards its copy and uses
    the winner's, so readers always see one complete build.
    """
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared LORAKIT_CACHE unreadable to others
    try:
        build(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)  # atomic; fails if another process already published `final`
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes them (the rename alone orders nothing)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _remove_stale_tmp(final: Path) -> None:
    """Delete temp dirs left by builds of `final` that crashed long ago."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for tmp in final.parent.glob(f"{final.name}.tmp-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass
