"""Peak memory per stage of a run, from Linux's own high-water mark.

A run's peak resident size is the figure a machine is sized by, and the first
question after it is which stage reached it. Sampling RSS misses short peaks;
the kernel's high-water mark (VmHWM) misses none but only grows. Linux lets a
process reset its own mark (`/proc/self/clear_refs`, value 5), so each stage
starts from its current size and its peak is read when it ends; the run's peak
is the largest of them, kept here because the reset also clears what
`getrusage` reports. Elsewhere, or where the reset is refused, each stage
reports the process's peak so far: an upper bound, never an under-count.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
#: What `clear_refs` takes to reset the peak RSS to the current RSS.
_RESET_PEAK = "5"


def high_water_mib() -> float:
    """This process's own peak RSS (VmHWM), since its start or its last reset. Not
    `getrusage` first: Linux keeps ru_maxrss across execve, so a child would report
    its parent's peak if larger."""
    try:
        for line in _STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """The process's peak RSS by stage (`start`, then `stop` gives the stage's peak) and
    over the whole run (`overall`)."""

    def __init__(self) -> None:
        self.overall = high_water_mib()

    def start(self) -> None:
        self.overall = max(self.overall, high_water_mib())
        # Not Linux, or not allowed: each stage then reports the peak so far.
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text(_RESET_PEAK, encoding="ascii")

    def stop(self) -> float:
        """The peak since `start`, in MiB."""
        peak = high_water_mib()
        self.overall = max(self.overall, peak)
        return peak

    def run_peak(self) -> float:
        """The largest peak so far, the current stretch's included, in MiB."""
        self.stop()
        return self.overall
