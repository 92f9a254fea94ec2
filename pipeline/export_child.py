"""The process `exporting.ExportJob` starts: a full run's return files, written while
the run writes its store.

Run as ``python -m mdm_pipeline.pipeline.export_child FOLDER OUT_DIR SOURCES``,
its inputs in FOLDER (`exporting.write_inputs`). It waits for a line on its
standard input, the sign that FOLDER holds the records' golden IDs, writes the
files into OUT_DIR (`exporting.export_from`), and prints one JSON line naming
them. On failure, or if the standard input ends first, it prints the error's
class alone (a message could quote a customer's values) and exits with 1.

It runs at a lower priority (`NICENESS`): the run's store stage, which the run
waits for, comes first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: Added to the child's niceness (see the module).
NICENESS = 10


def main(argv: list[str]) -> int:
    from mdm_pipeline.pipeline.exporting import GO, export_from

    try:
        folder, out_dir, sources = Path(argv[0]), Path(argv[1]), int(argv[2])
        if sys.stdin.readline() != GO:
            raise EOFError("no golden IDs")
        paths = export_from(folder, out_dir, sources)
    except Exception as exc:
        sys.stderr.write(type(exc).__name__ + "\n")
        return 1
    # The answer to the parent process (a protocol, not a message to a person).
    sys.stdout.write(json.dumps({"paths": [str(p) for p in paths]}) + "\n")
    return 0


if __name__ == "__main__":
    os.nice(NICENESS)
    sys.exit(main(sys.argv[1:]))
