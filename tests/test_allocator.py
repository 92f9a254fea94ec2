"""The nightly process keeps the memory it frees (glibc): a block freed and allocated
again costs no new page faults. Each case runs in a process of its own, as the
setting is the whole process's."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, sys
from mdm_pipeline.pipeline.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(64 * 2**20)  # zeroed: every page touched
del block
before = faults()
block = bytearray(64 * 2**20)
print(json.dumps({"took": took, "pages": faults() - before}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_a_freed_block_is_reused_without_new_page_faults() -> None:
    default, kept = _probe("default"), _probe("keep")
    # 64 MiB is 16k pages of 4 KiB: by default the second block is fresh memory again.
    assert default["pages"] > 8_000
    assert kept["took"] is True
    assert kept["pages"] < 1_000


_THREADS = """
import json, os, sys
from mdm_pipeline.pipeline.allocator import no_blas_threads
asked = no_blas_threads() if sys.argv[1] == "none" else None
import numpy, scipy.sparse.csgraph  # each bundles an OpenBLAS
print(json.dumps({"asked": asked, "threads": len(os.listdir("/proc/self/task")),
                  "value": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def _threads(mode: str, **env: str) -> dict:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", _THREADS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**environ, **env},
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/task")
def test_the_nightly_process_starts_no_blas_threads_and_keeps_a_users_setting() -> None:
    default, none = _threads("default"), _threads("none")
    assert none["asked"] is True and none["value"] == "1"
    if default["threads"] == 1:
        pytest.skip("this machine's OpenBLAS starts no threads (one core)")
    # Each OpenBLAS starts a thread per further core by default; none when asked.
    assert none["threads"] < default["threads"]
    mine = _threads("none", OPENBLAS_NUM_THREADS="2")
    assert mine["asked"] is False and mine["value"] == "2"
