"""The process `payloads.PayloadJob` starts: the payloads and hashes of a full run's
source records, made while the run matches.

Run as ``python -m mdm_pipeline.golden_records.payload_child FOLDER``, its inputs
in FOLDER (`payloads.write_inputs`). It writes FOLDER/payloads.arrow, one record
batch per chunk of the store's write order, then prints one JSON line naming it
(`snapshot_child.serve`: on failure, the error's class alone, exit status 1: a
message could quote a customer's values).

It runs at a lower priority (`NICENESS`): the run's own process compares pairs on
both cores while this one works, and the comparisons are what the run waits for;
this child has until the store stage to finish.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mdm_pipeline.golden_records.payloads import make_payloads
from mdm_pipeline.golden_records.snapshot_child import serve

#: Added to the child's niceness (see the module).
NICENESS = 10

if __name__ == "__main__":
    os.nice(NICENESS)
    sys.exit(serve(lambda folder: make_payloads(Path(folder)), sys.argv[1:]))
