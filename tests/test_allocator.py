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
