"""The process `exports.NightReturns` starts: an incremental night's return files,
written while the night writes its store.

Run as ``python -m mdm_pipeline.pipeline.returns_child STORE_FILE FOLDER --deferred``
(forked from the night's zygote where there is one). It starts ahead of its
inputs and waits until the run names them on its standard input
(`background.go_line`): FOLDER/sources.pickle (each source's spec, extract rows
and keys, and the folder to write into), and the Arrow files held.arrow (what
the store held of the rows of tonight's extracts: the reading child's file,
moved here, and mapped, not read), members.arrow, tonight.arrow (the
records the night re-decided, with their golden IDs) and deleted.arrow (the
records it removes). Then it writes the files (`exports.night_return_files`)
and the next night's held part (`exports.next_held`, FOLDER/held.parquet), and
prints one JSON line naming them; on failure, or if its input ends first, the error's class alone
(a message could quote a customer's values) and exit status 1. It never opens
the store.

It runs at a lower priority (`NICENESS`): the run's store stage comes first.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

from mdm_pipeline.golden_records import background
from mdm_pipeline.golden_records.snapshot_child import serve
from mdm_pipeline.golden_records.store_child import Inputs
from mdm_pipeline.pipeline.exports import RETURNS_SOURCES, next_held, night_return_files

#: The held part it makes for the next night (`exports.next_held`), in its folder.
HELD_FILE = "held.parquet"
#: Added to the child's niceness (see the module).
NICENESS = 10


def write_returns(store_file: str, folder: str, *deferred: str) -> dict[str, Any]:
    """The child's work once its inputs are there; what to answer."""
    inputs = Inputs(Path(folder), list(deferred) == [background.DEFERRED])
    tonight = inputs("tonight")
    stored = (inputs.table("held"), inputs("members"))
    # This run's own file, in the private folder it made for the child.
    with open(Path(folder) / RETURNS_SOURCES, "rb") as source:
        specs, raws, keys, out_dir = pickle.load(source)
    paths = night_return_files(specs, raws, keys, stored, tonight, Path(out_dir))
    held = next_held(specs, stored[0], tonight, inputs("deleted"))
    answer: dict[str, Any] = {"paths": [str(p) for p in paths], "held": None}
    if held is not None:
        answer["held"] = str(Path(folder) / HELD_FILE)
        Path(answer["held"]).write_bytes(held)
    return answer


if __name__ == "__main__":
    os.nice(NICENESS)
    sys.exit(serve(write_returns, sys.argv[1:]))
