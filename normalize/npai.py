"""NPAI (plis non distribuables): La Poste return reasons and the flag's life cycle.

A return flags the address *as it was sent*: the address the store held for
that record before this run when there is one, otherwise the current one. A
flag is cleared, never deleted, as soon as a later extract brings a different
normalised address, so the history stays queryable. Everything here is a pure
function of frames; reading return files and keeping the state are I/O done by
`sources/` and `golden_records/`.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mdm_pipeline.config import schema
from mdm_pipeline.config.schema import record_keys
from mdm_pipeline.normalize.text import fold, to_arrow

#: La Poste's categories: code -> label.
REASONS = {
    "INCONNU": "destinataire inconnu a l adresse",
    "ADRESSAGE": "defaut d acces ou d adressage",
    "REFUSE": "refuse",
    "NON_RECLAME": "avise non reclame",
    "DECEDE": "decede",
    "AUTRE": "autre",
}
_PATTERNS = (  # first match wins; applied to the folded reason text
    ("DECEDE", r"\bDECEDE"),
    ("REFUSE", r"\bREFUS"),
    ("NON_RECLAME", r"\bNON RECLAME|\bAVISE|\bNON RETIRE"),
    ("INCONNU", r"\bINCONNU|\bN HABITE PAS|\bNPAI\b|\bDEMENAGE|\bPARTI\b|\bNON IDENTIFI"),
    ("ADRESSAGE", r"\bADRESS|\bACCES\b|\bINACCESSIBLE|\bINCOMPLET|\bINSUFFISANT|\bBOITE"),
)
STATE_COLUMNS = (
    "source",
    "source_key",
    "address_hash",
    "return_date",
    "reason_code",
    "reason_label",
    "flagged_run",
    "cleared_run",
    "cleared_reason",
)


def reason_code(text: pd.Series) -> pd.Series:
    """La Poste category of each free-text return reason (AUTRE when none fits)."""
    folded = fold(text).fillna("")
    code = pd.Series("AUTRE", index=text.index, dtype=object)
    decided = pd.Series(False, index=text.index)
    for name, pattern in _PATTERNS:
        hit = ~decided & folded.str.contains(pattern, regex=True)
        code[hit] = name
        decided |= hit
    return code


def address_hash(block: pd.DataFrame) -> pd.Series:
    """A fingerprint of the normalised delivery address (NF lines 2 to 6), joined by "|",
    an empty line as empty text.

    The store keeps it, and a later run compares it with its own to tell whether a
    flagged address changed: it must stay the same function from one version to
    the next. The lines are joined in Arrow (Python's `+` over a million objects,
    four times, took 0.4 s of the run's own thread); the hash is pandas' of the
    same text (`schema.row_hashes`)."""
    lines = [
        pc.fill_null(schema.contiguous(to_arrow(block[f"rnvp_line{i}"])), "") for i in range(2, 7)
    ]
    joined = pc.binary_join_element_wise(*lines, pa.scalar("|", lines[0].type))
    text = pd.Series(pd.array(joined, dtype=schema.text_dtype()))
    hashed = schema.row_hashes(text)
    return pd.Series(hashed.astype(str), index=block.index, dtype=object)


def _only(frame: pd.DataFrame, wanted: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` whose (source, source_key) is among `wanted`'s."""
    if len(wanted) * 4 > len(frame):
        return frame
    return frame[record_keys(frame).isin(record_keys(wanted))]


def update_flags(
    previous: pd.DataFrame,
    returns: pd.DataFrame,
    current: pd.DataFrame,
    sent: pd.DataFrame,
    run_id: str,
) -> pd.DataFrame:
    """The NPAI state after this run (all rows, history included).

    previous: STATE_COLUMNS as stored. returns: (source, source_key, return_date,
    reason_code, reason_label) read from the return files. current: (source,
    source_key, address_hash) of this run's records. sent: (source, source_key,
    address_hash) the store held before this run.
    """
    state = previous.copy()
    key = ["source", "source_key"]
    # Only the records with a return or a flag are looked up: the million others are
    # not merged (a merge would hash every record's key, and sort them, three times).
    wanted = pd.concat([state[key], returns[key]], ignore_index=True).astype(str)
    current = _only(current, wanted)
    sent = _only(sent, wanted)
    if len(returns):
        fresh = returns.drop_duplicates([*key, "return_date", "reason_code"])
        seen = state[[*key, "return_date", "reason_code"]].astype(str)
        marker = (
            fresh[[*key, "return_date", "reason_code"]]
            .astype(str)
            .merge(seen, how="left", indicator=True)["_merge"]
            .to_numpy()
        )
        fresh = fresh[marker == "left_only"]
        as_sent = fresh.merge(
            sent.rename(columns={"address_hash": "sent_hash"}), on=key, how="left"
        ).merge(current, on=key, how="left")
        # Returns for records we do not hold are ignored (no flag without an address).
        as_sent = as_sent[as_sent["sent_hash"].notna() | as_sent["address_hash"].notna()]
        as_sent["address_hash"] = as_sent["sent_hash"].where(
            as_sent["sent_hash"].notna(), as_sent["address_hash"]
        )
        as_sent["flagged_run"] = run_id
        as_sent["cleared_run"] = None
        as_sent["cleared_reason"] = None
        state = pd.concat([state, as_sent[list(STATE_COLUMNS)]], ignore_index=True)
    # A flag holds while the record's address is the one that came back.
    active = state["cleared_run"].isna()
    now = state[[*key]].merge(current, on=key, how="left")["address_hash"].to_numpy()
    changed = active.to_numpy() & pd.notna(now) & (now != state["address_hash"].to_numpy())
    state.loc[changed, "cleared_run"] = run_id
    state.loc[changed, "cleared_reason"] = "address changed"
    return state[list(STATE_COLUMNS)].reset_index(drop=True)


def current_flags(state: pd.DataFrame) -> pd.DataFrame:
    """Per record, the latest active NPAI flag: npai_flag, npai_date, npai_reason."""
    active = state[state["cleared_run"].isna()].sort_values("return_date")
    latest = active.drop_duplicates(["source", "source_key"], keep="last")
    return pd.DataFrame(
        {
            "source": latest["source"],
            "source_key": latest["source_key"],
            "npai_flag": True,
            "npai_date": latest["return_date"],
            "npai_reason": latest["reason_code"],
        }
    ).reset_index(drop=True)


def empty_state() -> pd.DataFrame:
    """No NPAI history yet."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in STATE_COLUMNS})
