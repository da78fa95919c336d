"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

A population forward allocates and frees activation tensors of tens of MB many times a second.
With glibc's default settings each one is a fresh ``mmap``, and the first touch of every 4 KiB
page is a page fault: on the 2-core CPU this cost a quarter to a third of a training step's
time. :func:`retain_freed_memory` turns that off, so freed blocks are reused: EGGROLL training
ran 1.27-1.46x as many generations per second with it in a side-by-side test (BENCHMARKS.md).

It is not free: the process keeps its memory until it exits, and the heap keeps holes between
live blocks, so the peak grows. For a MeZO step on the 59M-parameter GPT of ``nograd bench
memory`` the peak went from 1.05x to 1.12x of inference. So ``nograd train`` turns it on for the
population methods (evolution strategies) only, and ``nograd bench`` for the population
benchmarks. Zeroth-order methods, whose point is inference memory, and the gradient baselines
keep glibc's defaults. Set ``NOGRAD_RETAIN_FREED_MEMORY=0`` to keep the defaults everywhere.
Library users can call it themselves::

    >>> import nograd.core.allocator
    >>> nograd.core.allocator.retain_freed_memory()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

ENV_VAR = "NOGRAD_RETAIN_FREED_MEMORY"


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and never trim freed memory.

    Returns True when the settings took effect; False where they do not apply (not Linux with
    glibc) or where ``NOGRAD_RETAIN_FREED_MEMORY=0`` opts out.
    """
    if os.environ.get(ENV_VAR, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on a non-glibc libc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; no mmap'd chunks, and freed heap top is kept up to INT_MAX
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def available_bytes() -> int | None:
    """Memory the system can give without swapping (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
