"""The process `background.ScopeRead`, `background.EvidenceRead` and
`background.ReturnsRead` start: a read of a SQLite store, handed back as files
(`read`: NAME.arrow, Arrow IPC, for an Arrow table; NAME.pickle for a frame of
Python objects; `background.answer_frame` reads either).

Run as ``python -m mdm_pipeline.golden_records.store_child TASK STORE_FILE FOLDER``,
its inputs in FOLDER as Arrow IPC files. It opens the store read-only and does
TASK:

- ``scope``: FOLDER/keys.arrow holds (source, source_key) of tonight's changed
  and deleted records; it reads `store.read_cluster_scope` of them (every
  record of their golden records, payloads included, and the golden records)
  into FOLDER/records.pickle and FOLDER/golden.pickle;
- ``returns``: FOLDER/fields.arrow (an empty table) gives the payload fields
  to read, FOLDER/whole.arrow the sources whose every record is read, at once;
  then FOLDER/keys.arrow holds (source, source_key, members) of the other rows
  of tonight's extracts whose record did not change; it reads
  `store.read_returns` of them all (members for the sources flagged so) into
  FOLDER/held.arrow (an Arrow table, handed on to the return files' writer as
  it is) and FOLDER/members.pickle;
- ``evidence``: FOLDER/touched.arrow and FOLDER/evidence.arrow hold the records
  tonight matches again or deletes and tonight's match evidence; it writes
  `store.evidence_changes` of them (FOLDER/gone.pickle, fresh.pickle,
  changed.pickle), at a lower priority (`EVIDENCE_NICENESS`, as ``returns``).

With a last argument ``--deferred`` it starts ahead of its inputs and waits
for each as it needs it (`Inputs`): the evidence's child reads the stored pairs
of the touched records before tonight's evidence is made. Then it prints one
JSON line naming the files (`snapshot_child.serve`: on failure, the error's
class alone, exit status 1).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mdm_pipeline.golden_records import background, store
from mdm_pipeline.golden_records.connection import _tune_sqlite
from mdm_pipeline.golden_records.snapshot_child import serve, write_table

KEYS = background.KEYS


class Inputs:
    """A task's inputs by name, as tables in its folder. Started ahead of them
    (`deferred`), it waits for each on its standard input, where the parent names
    those it has written (`background.go_line`); an input that ends first (the run
    stopped) ends the task."""

    def __init__(self, folder: Path, deferred: bool) -> None:
        self.folder = folder
        self._deferred = deferred
        self._given: set[str] = set()

    def wait(self, name: str | None = None) -> None:
        """Until `name` is given (None: the first inputs, whichever they are)."""
        while self._deferred and (name not in self._given if name else not self._given):
            self._given.update(background.given_inputs(sys.stdin.readline()))

    def __call__(self, name: str) -> pd.DataFrame:
        return self.table(name).to_pandas()

    def table(self, name: str) -> pa.Table:
        """Input `name` as the Arrow table it was handed as (mapped, not read)."""
        self.wait(name)
        return background.map_table(self.folder / f"{name}.arrow")


def _scope(conn: Connection, inputs: Inputs) -> dict[str, pd.DataFrame | pa.Table]:
    scope = store.read_cluster_scope(conn, inputs("keys"))
    return {"records": scope.records, "golden": scope.golden}


def _evidence(conn: Connection, inputs: Inputs) -> dict[str, pd.DataFrame | pa.Table]:
    # The stored pairs are read while the parent still matches, then compared with
    # tonight's evidence once it comes.
    stored = store.stored_evidence(conn, inputs("touched"))
    changes = store.compare_evidence(inputs("evidence"), stored)
    return {"gone": changes.gone, "fresh": changes.fresh, "changed": changes.changed}


def _returns(conn: Connection, inputs: Inputs) -> dict[str, pd.DataFrame | pa.Table]:
    # The extracts that are not deltas are read whole at once, while the run loads
    # them; the delta extracts' rows by key once the run has found the delta.
    fields = inputs.table("fields").schema
    whole, _ = store.read_returns(conn, fields, whole=inputs("whole")["source"].tolist())
    keys = inputs("keys")
    by_key, members = store.read_returns(
        conn, fields, keys[KEYS], member_sources=keys.loc[keys["members"], "source"].unique()
    )
    return {"held": pa.concat_tables([whole, by_key]), "members": members}


TASKS = {"scope": _scope, "evidence": _evidence, "returns": _returns}

#: Added to the evidence's child's niceness. Started ahead of its inputs, it imports
#: its modules while the run normalises and matches, and its answer is needed only
#: after the scope's child's and survivorship's (`pipeline.run`): at a lower priority,
#: the run and the scope's child, which the night waits for first, get the cores
#: (a 5% night at 1M records: clusters ready 0.4-1.4 s sooner, the scope's answer
#: waited for 0.80-0.87 s against 0.94-1.12 s, docs/benchmarks.md). The return
#: files' read too: read while the run normalises, beside the scope's child, it took
#: the run's core from it at its own priority (normalisation 0.5-1.5 s longer).
EVIDENCE_NICENESS = 10


def read(task: str, store_file: str, folder: str, *deferred: str) -> dict[str, Any]:
    """Do `task` on the store, its inputs and outputs in `folder`; what to print.

    Started ahead of its inputs (`background.DEFERRED` after the folder), it waits
    for the line that says the first are there (`Inputs`) on its standard input,
    its modules imported and the store not yet opened; an input that ends without
    it (the run stopped) ends this process without a read."""
    out = Path(folder)
    inputs = Inputs(out, list(deferred) == [background.DEFERRED])
    inputs.wait()

    # Read-only: this process never writes, whatever its code comes to do.
    engine = sa.create_engine(f"sqlite:///file:{quote(store_file)}?mode=ro&uri=true")
    sa.event.listen(engine, "connect", _tune_sqlite)
    try:
        with engine.connect() as conn:
            frames = TASKS[task](conn, inputs)
    finally:
        engine.dispose()
    answer = {}
    for name, frame in frames.items():
        if isinstance(frame, pa.Table):
            path = out / f"{name}.arrow"
            write_table(frame, str(path))
        else:
            # A frame of Python objects (the scope's stored payloads) as a pickle: made
            # Arrow here and pandas again by the run, the scope's 84k records took
            # 0.81 s and 0.20 s, pickled and unpickled 0.26 s and 0.13 s (the same
            # frame, exactly: dtypes included).
            path = out / f"{name}.pickle"
            with open(path, "wb") as sink:
                pickle.dump(frame, sink, protocol=pickle.HIGHEST_PROTOCOL)
        answer[name] = str(path)
    return answer


if __name__ == "__main__":
    task = sys.argv[1] if len(sys.argv) > 1 else ""
    if task in ("evidence", "returns"):
        os.nice(EVIDENCE_NICENESS)
    sys.exit(serve(lambda *args: read(task, *args), sys.argv[2:]))
