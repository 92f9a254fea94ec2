"""What the bench scripts share."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's own peak RSS. Not getrusage first: Linux keeps ru_maxrss across
    execve, so a child would report its parent's peak (e.g. normalised records) if larger."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
