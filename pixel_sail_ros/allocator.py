"""Keep the memory a frame frees for the next frame, instead of handing it back to the OS (glibc malloc).

Why: every frame allocates the same few-megabyte tensors (mask features, the resized image, the masks) and frees
them again. glibc returns a freed block to the OS when it was mmap'd, or when the free space at the heap's top
passes the trim threshold, and it moves both thresholds as the program runs. So whether a frame's tensors land on
pages the process already has, or on fresh ones it must fault in, drifts from run to run: 10 to 2900 minor page
faults per answer were measured for the bundled model at 640x480 on a 2-vCPU VM, the slow runs ~2-4 ms slower per
answer (docs/PERFORMANCE.md, 2026-12-02). Fixing both thresholds keeps those pages: blocks up to 32 MiB come from
the heap, and up to 1 GiB of free heap stays with the process. The cost is that RSS stays at its peak.

Process-wide and not undone; a no-op (with the reason) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_applied = False


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Fix glibc's mmap and trim thresholds for this process. Returns "" when applied, else why not."""
    global _applied
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"the C library is {libc_name or 'unknown'}, not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return f"mallopt is not available: {exc}"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    for name, param, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, mmap_threshold),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, trim_threshold)):
        if mallopt(param, int(value)) != 1:
            return f"mallopt({name}, {value}) was refused"
    _applied = True
    log.debug("malloc keeps freed memory: mmap threshold %d, trim threshold %d", mmap_threshold, trim_threshold)
    return ""


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` has been applied in this process."""
    return _applied


__all__ = ["keep_freed_memory", "keeps_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]
