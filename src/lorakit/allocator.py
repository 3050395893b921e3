"""Make freed tensor memory go back to the OS, so a training step's peak does not ratchet up.

glibc raises its mmap threshold after large blocks are freed (up to 32 MB), after which
activation-sized tensors come from the heap and freed pages stay with the process: peak RSS
grows from one step to the next. Pinning the threshold keeps big blocks in their own
mappings, returned on free. Called by the trainer; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations >= threshold with their own mmap (returned to the OS on free)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
