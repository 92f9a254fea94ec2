"""Peak memory per stage: each stage's own peak, the run's the largest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Run in a fresh interpreter: this process's allocator may keep freed memory resident
#: (other tests set `keep_freed_memory`), which a stage's reset peak would then hold.
_STAGES = """
import json, numpy as np
from mdm_pipeline.pipeline.memory import PeakMemory
memory = PeakMemory()
memory.start()
block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched
del block
first = memory.stop()
memory.start()
second = memory.stop()
print(json.dumps({"first": first, "second": second, "overall": memory.overall}))
"""


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="Linux's peak reset is needed"
)
def test_a_stage_peak_is_its_own_and_the_run_keeps_the_largest() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STAGES], capture_output=True, text=True, check=True
    )
    peaks = json.loads(done.stdout)
    # The second stage allocated nothing: the first one's peak is not counted again.
    assert peaks["first"] - peaks["second"] >= 250
    assert peaks["overall"] >= peaks["first"]


@pytest.mark.parametrize("threshold, collections", [(10**9, 0), (1, 6)])
def test_a_large_full_run_collects_cyclic_garbage_at_each_stage_after_the_load(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int, collections: int
) -> None:
    """A collection costs the same whatever the run's size: only a full run of at
    least COLLECT_FROM_RECORDS records pays it, once per stage after the load."""
    from mdm_pipeline.pipeline import run as run_module

    calls = []
    monkeypatch.setattr(run_module, "COLLECT_FROM_RECORDS", threshold)
    monkeypatch.setattr(run_module.gc, "collect", lambda *a: calls.append(a) or 0)
    monkeypatch.setenv("MDM_STORE_URL", f"sqlite:///{tmp_path / 's.sqlite'}")
    run_module.Pipeline.from_config(samples / "config.yaml").run()
    assert len(calls) == collections
