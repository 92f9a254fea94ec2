"""What the bench scripts share."""

from __future__ import annotations

from typing import Any

# This process's own peak RSS, as the pipeline reads it.
from mdm_pipeline.pipeline.memory import high_water_mib as peak_rss_mib


def changes(summary: Any) -> dict[str, int]:
    """What an incremental run (a `RunSummary`) found changed and wrote: the size of
    the night, beside its time."""
    names = ("records_changed", "records_deleted", "records_reclustered")
    names += ("golden_created", "golden_updated", "golden_retired")
    return {name: getattr(summary, name) for name in names}


class TreePeak:
    """Peak RSS of this process and all its descendants, sampled every `interval`
    seconds from /proc: Spark's JVM and its Python workers are processes of their own,
    which this process's high-water mark does not count."""

    def __init__(self, interval: float = 0.5) -> None:
        import os
        import threading

        self._pid = os.getpid()
        self._interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._sample(), peak_rss_mib())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_mib = max(self.peak_mib, self._sample())

    def _sample(self) -> float:
        import os

        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                ppid, pages = int(fields[1]), int(fields[21])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
            rss[int(entry)] = pages
        total, todo = 0, [self._pid]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo.extend(children.get(pid, []))
        return total * os.sysconf("SC_PAGE_SIZE") / 2**20
