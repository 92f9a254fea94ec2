"""Files out of the store: a business unit's records back in its own format, and the
golden records as CSV or Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.golden_records.jsonrows import read_fields
from mdm_pipeline.golden_records.store import RETURNS_KEYS
from mdm_pipeline.pipeline.exports import (
    RETURN_FIELDS,
    RETURNS_SPLIT_ROWS,
    stored_return_columns,
    writers_shares,
)

runner = CliRunner()


def _invoke(url: str, *args: str) -> object:
    return runner.invoke(app, list(args), env={"MDM_STORE_URL": url})


def test_a_bu_gets_its_rows_back_in_its_own_format(samples: Path, tmp_path: Path) -> None:
    cfg = samples / "config.yaml"
    extract = samples / "magasins_fidelite.csv"
    with extract.open(encoding="cp1252", newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    header = rows[0]
    col = {n: i for i, n in enumerate(header)}
    # A cell a spreadsheet would run: it must come back inert.
    target = next(i for i, r in enumerate(rows[1:], 1) if len(r) == len(header))
    rows[target][col["ADR3"]] = '=HYPERLINK("http://x")'
    with extract.open("w", encoding="cp1252", newline="") as f:
        csv.writer(f, delimiter=";").writerows(rows)
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert _invoke(url, "run", "--config", str(cfg)).exit_code == 0
    done = _invoke(
        url, "export", "bu", "--config", str(cfg), "stores", "--out", str(tmp_path / "o")
    )
    assert done.exit_code == 0, done.output
    path = tmp_path / "o" / "stores_return.csv"
    back = pd.read_csv(path, sep=";", encoding="cp1252", dtype=str, keep_default_na=False)
    assert list(back.columns[: len(header)]) == header
    for added in (
        "mdm_golden_id",
        "mdm_rnvp_line6",
        "mdm_address_status",
        "mdm_email_valid",
        "mdm_phone_valid",
        "mdm_npai",
        "mdm_npai_date",
        "mdm_bu_duplicates",
    ):
        assert added in back.columns, added
    assert (back["mdm_golden_id"] != "").all()
    assert back.loc[back["NUM_CARTE"] == rows[target][0], "ADR3"].iloc[0].startswith("'=")
    # Its duplicates are its other cards in the same golden record, both ways.
    engine = sa.create_engine(url)
    xref = pd.read_sql(
        "select source_key, golden_id from mdm_source_records where source = 'stores'", engine
    )
    engine.dispose()
    shared = xref[xref.duplicated("golden_id", keep=False)]
    assert len(shared)
    gid = shared["golden_id"].iloc[0]
    pair = sorted(shared.loc[shared["golden_id"] == gid, "source_key"])
    got = back.set_index("NUM_CARTE")["mdm_bu_duplicates"]
    assert got[pair[0]].split() == pair[1:] and pair[0] in got[pair[1]].split()
    lonely = xref[~xref["golden_id"].isin(shared["golden_id"])]["source_key"].iloc[0]
    assert got[lonely] == ""


def test_golden_records_export_as_csv_and_parquet(samples: Path, tmp_path: Path) -> None:
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert _invoke(url, "run", "--config", str(cfg)).exit_code == 0
    engine = sa.create_engine(url)
    active = pd.read_sql("select golden_id from mdm_golden_records where status = 'active'", engine)
    engine.dispose()
    for name in ("golden.csv", "golden.parquet"):
        path = tmp_path / name
        done = _invoke(url, "export", "golden", "--config", str(cfg), "--out", str(path))
        assert done.exit_code == 0, done.output
        frame = pd.read_csv(path, dtype=str) if name.endswith("csv") else pd.read_parquet(path)
        assert sorted(frame["golden_id"]) == sorted(active["golden_id"])
        assert {"first_name", "last_name", "rnvp_line6", "members"} <= set(frame.columns)
    csv_frame = pd.read_csv(tmp_path / "golden.csv", dtype=str, keep_default_na=False)
    assert not csv_frame["phone"].str.startswith("+").any()  # '+33…' is written '\\'+33…'
    bad = _invoke(url, "export", "golden", "--config", str(cfg), "--out", str(tmp_path / "g.xls"))
    assert bad.exit_code == 2 and "must end in .csv or .parquet" in bad.stderr


def test_an_unknown_bu_is_one_line(samples: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    done = _invoke(url, "export", "bu", "--config", str(samples / "config.yaml"), "nope")
    assert done.exit_code == 2
    assert done.stderr.strip() == (
        "error: export bu: no source named 'nope' (sources: ecommerce, stores, callcentre, b2b)"
    )


def _held(keys: list[str], golden_ids: list[str], payloads: list[str]) -> pa.Table:
    """Stored records as `store.read_returns` gives them."""
    values = read_fields([p.encode() for p in payloads], RETURN_FIELDS)
    own = [pa.array(v, type=pa.string()) for v in (["bu"] * len(keys), keys, golden_ids)]
    return pa.Table.from_arrays(
        [*own, *values.columns], names=[*RETURNS_KEYS, *RETURN_FIELDS.names]
    )


def test_a_row_s_duplicates_are_its_golden_record_s_members_after_the_night() -> None:
    """A night returns an unchanged row (X) read from the store beside the records it
    re-decided: X's stored golden record G lost Y (deleted tonight) and gained Z; X's
    values are tonight's where the night has them, its duplicates G's members now.
    A row of a golden record the night left alone (W) keeps its stored members (V).
    A stored record of G that is not among the rows (D, read with a full extract's
    whole source but deleted from it tonight) is no one's duplicate."""
    held = _held(
        ["X", "W", "D"],
        ["G", "H", "G"],
        ['{"email_norm": "X@STORED"}', '{"email_norm": "W@STORED"}', '{"email_norm": "D"}'],
    )
    members = pd.DataFrame({"source_key": ["X", "Y", "W", "V"], "golden_id": ["G", "G", "H", "H"]})
    tonight = pd.DataFrame(
        {"source_key": ["X", "Z"], "golden_id": ["G", "G"], "email_norm": ["X@NEW", "Z@NEW"]}
    )
    keys = pd.Series(["W", "X", "NEW"])
    added = stored_return_columns(keys, held, members, tonight)
    assert added["mdm_golden_id"].tolist()[:2] == ["H", "G"]
    assert pd.isna(added["mdm_golden_id"].iloc[2])
    assert added["mdm_email"].tolist()[:2] == ["W@STORED", "X@NEW"]
    assert added["mdm_bu_duplicates"].tolist() == ["V", "Z", ""]
    assert added["mdm_npai"].tolist() == [False, False, False]
    # From the store alone (`mdm export bu`): the stored members.
    alone = stored_return_columns(keys, held, members)
    assert alone["mdm_bu_duplicates"].tolist() == ["V", "Y", ""]
    assert alone["mdm_email"].tolist()[:2] == ["W@STORED", "X@STORED"]


def test_many_rows_returned_are_shared_between_the_child_and_the_run() -> None:
    """The scale benchmark's full extracts: 364k, 320k, 229k and 50k rows. A night that
    re-decided nothing leaves the smaller share to the child (the run's store takes
    tenths of a second); one that re-decided many records (a steady night's 91k)
    leaves it the larger, the run writing the store beside its own share."""
    rows = [364_286, 319_689, 228_785, 50_000]
    for redecided, child_takes in ((0, min), (1_000, min), (91_000, max)):
        shares = writers_shares(rows, redecided)
        assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3] and all(shares)
        sizes = [sum(rows[i] for i in share) for share in shares]
        assert abs(sizes[0] - sizes[1]) <= 150_000
        assert sizes[0] == child_takes(sizes), redecided
    # A delta night's few rows, or one source, go to one writer.
    assert writers_shares([RETURNS_SPLIT_ROWS // 4] * 3) == [[0, 1, 2]]
    assert writers_shares([RETURNS_SPLIT_ROWS * 4]) == [[0]]
    assert writers_shares([]) == [[]]
