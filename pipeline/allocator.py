"""The nightly job's process settings: it keeps the memory it frees, for its own
next allocations, and starts no BLAS threads.

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

The OpenBLAS that numpy's and scipy's wheels bundle starts a pool of threads
(one per further core) as each is imported, and each thread busy-waits for
work for a while after it starts. The pipeline never calls BLAS, and its
processes (the run and the children that read the store beside it) already
keep both cores busy: on two cores those threads took 0.4 s of CPU from a 5%
incremental night at 1M records (docs/benchmarks.md). The setting is made in
the environment, so that the child processes inherit it.
"""

from __future__ import annotations

import ctypes
import os
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


#: The environment variable OpenBLAS reads, once, when it is loaded.
BLAS_THREADS_VARIABLE = "OPENBLAS_NUM_THREADS"


def no_blas_threads() -> bool:
    """Ask OpenBLAS for no threads of its own, in this process and the ones it starts.

    Only a library loaded after this call is told (OpenBLAS reads its environment
    once), so the `mdm run` command calls it before it imports numpy. A value the
    user set is left alone. Returns whether the setting is in the environment.
    """
    os.environ.setdefault(BLAS_THREADS_VARIABLE, "1")
    return os.environ[BLAS_THREADS_VARIABLE] == "1"
