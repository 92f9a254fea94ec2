"""The nightly job's process keeps the memory it frees, for its own next allocations.

A run builds and drops frames, JSON texts and Arrow buffers of tens of megabytes
all along. By default glibc's malloc serves each large block with its own
`mmap` and unmaps it when freed, and trims the heap's free top: every next
block is then fresh memory, which the kernel zeroes page by page the first time
it is touched. On the project's virtual machines that costs 0.2-2 s a gigabyte
(docs/benchmarks.md), and a 5% incremental run at 1M records touched 2.5 GiB
that way, a third of it memory it had just freed. Served from the heap and kept
there, freed blocks are reused without a fault: the same run faults a fifth fewer
pages and spends a second less in the kernel.

The process's peak is unchanged (what is kept is what it had in use); its
resident size then stays at that peak until it exits, which suits a batch
process. Only the `mdm run` command (and the benchmarks, which time what it
does) ask for this: a program that imports the pipeline keeps its own allocator
settings.
"""

from __future__ import annotations

import ctypes
import sys

#: glibc's `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory at the heap's top beyond this is still handed back (`mallopt` takes
#: an int): a run's transient gigabyte is kept, not an unbounded amount.
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep what is freed there (glibc only).

    Returns whether the allocator took both settings: False on another C library
    or platform, where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc returns 1 on success; musl's stub returns 0 and changes nothing.
    return bool(mallopt(_M_MMAP_MAX, 0) == 1) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
