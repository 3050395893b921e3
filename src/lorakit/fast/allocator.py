"""Where a CPU training step's big tensors come from: a caching allocator, else glibc's mmap.

A training step allocates and frees the same activation sizes every step. glibc serves them from
its heap, which fragments around the (tokens, hidden) temporaries and keeps what it grew: the
peak ratchets up. Given their own mappings instead (a lower mmap threshold), they go back to
the OS on free but are zero-filled and page-faulted in anew each time (~1.4 million faults a step
for SmolLM2 in memory mode). `cache_cpu_allocations` installs a caching allocator, as PyTorch
has for CUDA: blocks of 1 MB and more are kept on free, by size (rounded to 64 KB), and handed
out again, so after the first step there are no page faults and no fragmentation. It is C++
(PyTorch lets an allocator be set only from C++), compiled once per Python environment with
the system's compiler and ninja (~20 s; kept under ~/.cache/torch_extensions); where that fails,
the trainer falls back to `return_freed_memory_to_os` (memory mode) or glibc's default.

Who installs it: lorakit's trainer before its first step, and a lorakit PeftModel the first time it
runs a training forward on a CPU (`model(input_ids, labels=...)` in a plain loop or in
transformers' Trainer), so that both train alike. It is process-global and stays for the life of
the process: `LORAKIT_CPU_ALLOCATOR=0` in the environment (or `PeftModel.cpu_allocator = False`
for the plain API) leaves torch's allocator alone; `cache_cpu_allocations()` installs it
explicitly whatever the environment says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import sys
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
ENV = "LORAKIT_CPU_ALLOCATOR"  # "0", "off", "false" or "no": no automatic CPU allocator set-up
_log = logging.getLogger(__name__)
_caching: object | None = None  # the loaded extension, once installed
_prepared: str | None = None  # what prepare_cpu_training did, once it ran

_CACHING_SOURCE = r"""
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {
struct Caching final : public c10::Allocator {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // rounded size -> blocks not in use
  std::unordered_map<void*, size_t> block_size;                 // every block ever made
  c10::Allocator* fallback = nullptr;                           // small tensors
  c10::DeleterFnPtr fallback_deleter = nullptr;
  size_t threshold = 1 << 20;
  int64_t held = 0;

  static size_t rounded(size_t n) { return (n + 65535) & ~size_t(65535); }
  c10::DataPtr allocate(size_t n) override;
  c10::DeleterFnPtr raw_deleter() const override;  // raw_allocate'd blocks (oneDNN scratch) come back here
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

Caching caching;

void give_back(void* block) {
  {
    std::lock_guard<std::mutex> lock(caching.mu);
    auto it = caching.block_size.find(block);
    if (it != caching.block_size.end()) {
      caching.free_blocks[it->second].push_back(block);
      return;
    }
  }
  caching.fallback_deleter(block);  // a small block, raw-allocated through us from the fallback
}

c10::DeleterFnPtr Caching::raw_deleter() const { return &give_back; }

c10::DataPtr Caching::allocate(size_t n) {
  if (n < threshold) return fallback->allocate(n);
  size_t size = rounded(n);
  void* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = free_blocks.find(size);
    if (it != free_blocks.end() && !it->second.empty()) {
      block = it->second.back();
      it->second.pop_back();
    }
  }
  if (block == nullptr) {
    block = c10::alloc_cpu(size);
    std::lock_guard<std::mutex> lock(mu);
    block_size[block] = size;
    held += static_cast<int64_t>(size);
  }
  return {block, block, &give_back, c10::Device(c10::DeviceType::CPU)};
}
}  // namespace

void install(int64_t threshold) {
  caching.fallback = c10::GetCPUAllocator();
  caching.fallback_deleter = caching.fallback->raw_deleter() ? caching.fallback->raw_deleter() : &c10::free_cpu;
  caching.threshold = static_cast<size_t>(threshold);
  c10::SetCPUAllocator(&caching, /*priority=*/100);
}

int64_t held_bytes() {
  std::lock_guard<std::mutex> lock(caching.mu);
  return caching.held;
}
"""


def cache_cpu_allocations(threshold_bytes: int = 1 << 20) -> bool:
    """Serve CPU tensors of >= threshold_bytes from a cache of freed blocks, for the rest of the
    process (blocks are kept, not returned to the OS). True once installed; False, with the
    reason logged, where the extension cannot be built (no C++ compiler or ninja)."""
    global _caching
    if _caching is not None:
        return True
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline("lorakit_caching_allocator", cpp_sources=_CACHING_SOURCE,
                             functions=["install", "held_bytes"], build_directory=str(_build_directory()),
                             verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use glibc's allocator
        _log.warning("lorakit: CPU caching allocator unavailable (%s); using the default allocator",
                     str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    module.install(threshold_bytes)
    _caching = module
    return True


def _build_directory() -> Path:
    """One build per Python environment (two venvs sharing one directory would rebuild in turn),
    under PyTorch's own extensions directory."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build = root / f"lorakit_caching_allocator-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"
    build.mkdir(parents=True, exist_ok=True)
    return build


def cached_bytes() -> int:
    """Bytes the caching allocator holds (in use or kept for reuse); 0 when it is not installed."""
    return int(_caching.held_bytes()) if _caching is not None else 0


def automatic() -> bool:
    """Whether lorakit may set up the CPU allocator by itself (the environment did not say no)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def prepare_cpu_training(gradient_checkpointing: bool) -> str:
    """What lorakit does before training on a CPU (its trainer, and a PeftModel's first training
    forward there): the caching allocator, else (memory mode) glibc's mmap setting. Returns
    "caching", "mmap", "default", or "off" where the environment opts out (`ENV`). The first call
    in a process decides (a later memory-mode call may still add the mmap setting)."""
    global _prepared
    if _prepared is None:
        _prepared = "off" if not automatic() else "caching" if cache_cpu_allocations() else "default"
    if _prepared == "default" and gradient_checkpointing and return_freed_memory_to_os():
        _prepared = "mmap"
    return _prepared


def cpu_training_prepared() -> bool:
    """True once `prepare_cpu_training` ran in this process (what it did aside)."""
    return _prepared is not None


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations >= threshold with their own mmap (returned to the OS on free)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
