"""The cache root and the atomic build-once directory publish."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorakit.models import build_dir_once, cache_dir
from lorakit.models.cache import STALE_TMP_SECONDS


def _siblings(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir())


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lorakit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lorakit"
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lk"))
    assert cache_dir() == tmp_path / "lk"


def test_builds_once_then_reuses(tmp_cache: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights").write_text("v1")

    final = tmp_cache / "models" / "m"
    assert build_dir_once(final, build) == final
    assert build_dir_once(final, build) == final
    assert len(calls) == 1 and calls[0] != final
    assert (final / "weights").read_text() == "v1"
    assert _siblings(final) == ["m"]


def test_failure_mid_write_leaves_nothing(tmp_cache: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "half.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    final = tmp_cache / "models" / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        build_dir_once(final, broken)
    assert not final.exists()
    assert _siblings(final) == []  # temp dir cleaned up too
    build_dir_once(final, lambda tmp: (tmp / "ok").write_text("1"))
    assert (final / "ok").exists()


def test_hard_crash_never_publishes(tmp_cache: Path) -> None:
    """A process killed mid-build (no cleanup runs) leaves only a temp dir, never `final`."""
    final = tmp_cache / "models" / "m"
    code = (
        "import os; from pathlib import Path; from lorakit.models import build_dir_once\n"
        "def die(tmp):\n"
        "    (tmp / 'half').write_text('x'); os._exit(3)\n"
        f"build_dir_once(Path({str(final)!r}), die)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    assert not final.exists()
    (leftover,) = final.parent.glob("m.tmp-*")
    build_dir_once(final, lambda tmp: (tmp / "ok").write_text("1"))
    assert sorted(os.listdir(final)) == ["ok"]
    assert leftover.exists()  # recent: it may belong to a build still running elsewhere


def test_stale_temp_dirs_are_swept(tmp_cache: Path) -> None:
    final = tmp_cache / "models" / "m"
    old, recent, other = (tmp_cache / "models" / n for n in ("m.tmp-old", "m.tmp-new", "x.tmp-old"))
    for d in (old, recent, other):
        d.mkdir(parents=True)
    stale = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (stale, stale))
    os.utime(other, (stale, stale))
    build_dir_once(final, lambda tmp: None)
    assert not old.exists() and recent.exists() and other.exists()


def test_loser_of_rename_race_uses_winner(tmp_cache: Path) -> None:
    final = tmp_cache / "models" / "m"

    def slow_loser(tmp: Path) -> None:
        (tmp / "who").write_text("loser")
        # Another process publishes while we are still converting.
        build_dir_once(final, lambda t: (t / "who").write_text("winner"))

    assert build_dir_once(final, slow_loser) == final
    assert (final / "who").read_text() == "winner"
    assert _siblings(final) == ["m"]


def test_concurrent_builders_agree(tmp_cache: Path) -> None:
    final = tmp_cache / "models" / "m"
    both_building = threading.Barrier(2, timeout=10)
    results: list[Path] = []

    def build(tmp: Path) -> None:
        name = threading.current_thread().name
        (tmp / "a").write_text(name)
        both_building.wait()  # both are mid-build when either publishes
        (tmp / "b").write_text(name)

    threads = [threading.Thread(target=lambda: results.append(build_dir_once(final, build)), name=n)
               for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final, final]
    assert (final / "a").read_text() == (final / "b").read_text()  # one builder's files only
    assert _siblings(final) == ["m"]
