"""Keep freed memory in glibc's heap, so that large CPU tensors are not fresh ``mmap`` pages.

With glibc's defaults every allocation over 32 MiB is its own ``mmap`` and goes back to the
kernel when freed; the next one is zeroed by the kernel page by page on first touch. The chunked
path allocates such tensors at every step once T reaches a few thousand tokens, and on a 2-core
machine an elementwise op on 8M floats then costs 1.7 ns per element instead of 0.3, which made
forward+backward time grow 16-21x from 2K to 16K tokens instead of 8x
(``benchmarks/cpu_scaling.py``, ``--malloc``). PyTorch's CPU tuning guide recommends jemalloc or
tcmalloc for the same reason; this is the no-install equivalent. The cost: the process keeps its
peak heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to their maximum for this process. Returns whether
    it applied (False where the C library is not glibc, e.g. macOS or musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
