"""Process settings for fast CPU inference: the memory allocator.

A CNN forward pass allocates and frees tensors of tens of megabytes for every layer of every batch (EfficientNet-
Lite0's first activation is 51 MB at batch 32). glibc's malloc serves blocks that large with ``mmap`` and gives
them back with ``munmap`` when freed, so every layer of every batch page-faults its output into existence again:
on this project's 2-core machine the kernel's share of a forward pass was as large as the arithmetic's, and the
bare forward pass ran at 58 img/s instead of 150-190 (benchmarks/results/index.json). PyTorch's own CPU tuning
guide recommends jemalloc or tcmalloc for this; without a preloaded allocator the same effect comes from telling
glibc to serve every block from its heap and to keep freed memory for reuse (``mallopt``), which is what
:func:`keep_freed_memory` does. The cost is that the process keeps its peak heap (a few hundred MB while
indexing) instead of returning it to the system between batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30  # freed heap memory kept for reuse before any is given back

# Environment for a process whose forward passes run off its main thread: glibc reads it at start-up, and every
# thread then allocates from the main arena (see keep_freed_memory).
SINGLE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}

_done = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of unmapping it (once per process). Returns whether the
    setting is in effect: False off glibc (macOS, musl), where nothing changes.

    This covers forward passes on the main thread. A thread other than the main one allocates from its own arena,
    whose heaps are at most 64 MB, so a bigger tensor is mmap'd and unmapped again whatever M_MMAP_MAX says (a
    forward pass on such a thread ran at 50-63 img/s instead of 166-178). Setting M_ARENA_MAX here does not help a
    thread that already has its arena; a process that runs its model on another thread (a Ray Data actor) gets
    :data:`SINGLE_ARENA_ENV` at start-up instead. Not set for `mammals index` itself: with one arena the main
    thread's forward pass ran at 178 instead of 220 img/s (the other threads' small allocations share its lock)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    except (OSError, AttributeError):  # no libc to load, or one without mallopt (musl)
        return False
    if not ok:
        log.debug("mallopt refused the allocator settings; running with the defaults")
    _done = ok
    return ok
