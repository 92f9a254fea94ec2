"""The process `exporting.ExportJob` starts: a full run's return files, written while
the run writes its store.

Run as ``python -m mdm_pipeline.pipeline.export_child FOLDER OUT_DIR SOURCES``,
its inputs in FOLDER (`exporting.write_inputs`). It waits for a line on its
standard input, the sign that FOLDER holds the records' golden IDs, writes the
files into OUT_DIR and the next night's held part into FOLDER
(`exporting.export_from`), and prints one JSON line naming the files. On
failure, or if the standard input ends first, it prints the error's class alone
(a message could quote a customer's values) and exits with 1.

It runs at a lower priority (`NICENESS`): the run's store stage, which the run
waits for, comes first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mdm_pipeline.golden_records.snapshot_child import serve
from mdm_pipeline.pipeline.exporting import GO, export_from

#: Added to the child's niceness (see the module).
NICENESS = 10


def export(folder: str, out_dir: str, sources: str) -> dict[str, Any]:
    """The child's work, once told that the golden IDs are there; what to answer."""
    if sys.stdin.readline() != GO:
        raise EOFError("no golden IDs")
    return {"paths": [str(p) for p in export_from(Path(folder), Path(out_dir), int(sources))]}


if __name__ == "__main__":
    os.nice(NICENESS)
    sys.exit(serve(export, sys.argv[1:]))
