"""The process `payloads.PayloadJob` starts: the payloads and hashes of a full run's
source records, made while the run matches.

Run as ``python -m mdm_pipeline.golden_records.payload_child FOLDER``, its inputs
in FOLDER (`payloads.write_inputs`). It writes FOLDER/payloads.arrow, one record
batch per chunk of the store's write order, then prints one JSON line naming it
(`snapshot_child.serve`: on failure, the error's class alone, exit status 1: a
message could quote a customer's values).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mdm_pipeline.golden_records.payloads import make_payloads
from mdm_pipeline.golden_records.snapshot_child import serve

if __name__ == "__main__":
    sys.exit(serve(lambda folder, _: make_payloads(Path(folder)), [*sys.argv[1:2], ""]))
