"""Return files: the columnar CSV writer writes what pandas' writer writes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdm_pipeline.pipeline.exporting import bu_duplicates
from mdm_pipeline.sources import writers
from mdm_pipeline.sources.writers import neutralise_formulas, write_csv

#: Texts made of what a CSV writer treats specially: delimiters, quotes, line breaks,
#: formula starts, accents and characters cp1252 cannot hold.
_TEXT = st.text(alphabet=st.sampled_from(list("ab ;,|\t\"'\n\r=+-@éœ€漢§")), max_size=6)
_CELL = st.one_of(st.none(), _TEXT)


def _pandas(frame: pd.DataFrame, path: Path, sep: str, quotechar: str, encoding: str) -> bytes:
    neutralise_formulas(frame).to_csv(
        path,
        sep=sep,
        quotechar=quotechar,
        index=False,
        encoding=encoding,
        errors="replace",
        lineterminator="\n",
    )
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.tuples(_CELL, _CELL, st.one_of(st.none(), st.floats(-5, 5))), max_size=12),
    sep=st.sampled_from([",", ";", "|", "\t", "§"]),
    quotechar=st.sampled_from(['"', "'"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "cp1252", "latin-1", "iso-8859-15"]),
    chunk=st.integers(1, 5),
)
def test_columnar_csv_is_pandas_csv(
    rows: list, sep: str, quotechar: str, encoding: str, chunk: int
) -> None:
    frame = pd.DataFrame(rows, columns=["nom", "prenom;x", "score"]).astype({"nom": object})
    frame["nom_str"] = frame["nom"].astype("string")  # a string-dtype column is text too
    frame["nom_arrow"] = frame["nom"].astype(pd.StringDtype("pyarrow", na_value=np.nan))
    frame["flag"] = pd.array([i % 3 == 0 if i % 4 else None for i in range(len(frame))], "boolean")
    frame["valid"] = np.arange(len(frame)) % 2 == 0
    frame["n"] = np.arange(len(frame)) - 3
    frame["mixed"] = pd.Series([-1.5, "x", None, True] * 3, dtype=object)[: len(frame)].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ours.csv", Path(tmp) / "theirs.csv"
        saved = writers.CSV_CHUNK_ROWS
        writers.CSV_CHUNK_ROWS = chunk  # several chunks, and a BOM written only once
        try:
            write_csv(frame, ours, sep=sep, quotechar=quotechar, encoding=encoding)
        finally:
            writers.CSV_CHUNK_ROWS = saved
        assert ours.read_bytes() == _pandas(frame, theirs, sep, quotechar, encoding)


def test_formulas_in_string_dtype_columns_are_neutralised(tmp_path: Path) -> None:
    # An e-mail or an RNVP line starting with "=" is as dangerous as a name.
    frame = pd.DataFrame(
        {"id": ["1", "2"], "mdm_email": pd.array(["=cmd@x.fr", "a@x.fr"], dtype="string")}
    )
    write_csv(frame, tmp_path / "out.csv")
    back = pd.read_csv(tmp_path / "out.csv", dtype=str)
    assert back["mdm_email"].tolist() == ["'=cmd@x.fr", "a@x.fr"]


@pytest.mark.parametrize("values", [[], ["x"], ["", None]])
def test_a_single_column_is_written_as_pandas_writes_it(tmp_path: Path, values: list) -> None:
    frame = pd.DataFrame({"only": pd.Series(values, dtype=object)})
    write_csv(frame, tmp_path / "ours.csv")
    assert (tmp_path / "ours.csv").read_bytes() == _pandas(
        frame, tmp_path / "theirs.csv", ",", '"', "utf-8"
    )


def _duplicates_by_groupby(keys: list[str], gids: list) -> list[str]:
    """The duplicates column as the group-by it replaced computed it."""
    pairs = pd.DataFrame({"gid": gids, "key": keys}).dropna(subset=["gid"])
    both = pairs.merge(pairs, on="gid", suffixes=("", "_other"))
    both = both[both["key"] != both["key_other"]].sort_values(["key", "key_other"])
    dupes = both.groupby("key")["key_other"].agg(" ".join)
    return pd.Series(keys).map(dupes).fillna("").tolist()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(alphabet="abcé1 ", min_size=1, max_size=3), st.sampled_from("GHIJ-")),
        max_size=15,
        unique_by=lambda row: row[0],
    )
)
def test_bu_duplicates_are_the_other_keys_of_each_golden_record(rows: list) -> None:
    keys = [k for k, _ in rows]
    gids = [None if g == "-" else g for _, g in rows]
    got = bu_duplicates(np.array(keys, dtype=object), np.array(gids, dtype=object))
    assert got.tolist() == _duplicates_by_groupby(keys, gids)


def test_integers_of_every_width_sign_and_nullability_are_pandas_csv(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
            "i8": np.array([-128, 5], dtype=np.int8),
            "nullable": pd.array([1, None], dtype="Int64"),
        }
    )
    write_csv(frame, tmp_path / "ours.csv")
    assert (tmp_path / "ours.csv").read_bytes() == _pandas(
        frame, tmp_path / "theirs.csv", ",", '"', "utf-8"
    )


def test_a_text_column_in_several_chunks_is_written_as_one_in_one_chunk(tmp_path: Path) -> None:
    """A column concatenated from several sources is an Arrow array of several chunks;
    a slice of it is read in place by the writer only once in one piece."""
    from mdm_pipeline.config.schema import text_dtype

    first = pd.Series(["=SUM(A1)", "Dupont; Jean"], dtype=text_dtype())
    second = pd.Series(['Le "Central"', None, "Élise"], dtype=text_dtype())
    chunked = pd.concat([first, second], ignore_index=True).iloc[1:]
    whole = pd.Series(chunked.tolist(), index=chunked.index, dtype=text_dtype())
    assert chunked.array._pa_array.num_chunks == 2
    assert whole.array._pa_array.num_chunks == 1
    for name, column in (("chunked", chunked), ("whole", whole)):
        frame = pd.DataFrame({"id": ["1", "2", "3", "4"]})
        frame["v"] = column.reset_index(drop=True)
        assert frame["v"].array._pa_array.num_chunks == (2 if name == "chunked" else 1)
        write_csv(frame, tmp_path / f"{name}.csv", sep=";")
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


@pytest.mark.parametrize("columns", [["id"], ["id", "name"]])
def test_a_return_file_written_by_pieces_is_the_file_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, columns: list[str]
) -> None:
    """One column (pandas' writer, from the pieces together) or more (`CsvWriter`, a
    piece at a time): every piece's rows are in the file."""
    from mdm_pipeline.config.settings import CsvSource

    monkeypatch.setattr(writers, "CSV_CHUNK_ROWS", 2)
    spec = CsvSource(
        format="csv", name="bu", path=Path("bu.csv"), mapping={"source_key": "id"}, delimiter=";"
    )
    raw = pd.DataFrame({"id": ["=1", "2", "", "4", "5"], "name": ["a", "b;c", None, "d", "e"]})
    added = pd.DataFrame(index=range(5))
    whole = writers.write_back(spec, raw[columns], added, tmp_path / "whole")
    pieces = [(raw[columns].iloc[a : a + 2], added.iloc[a : a + 2]) for a in (0, 2, 4)]
    by_pieces = writers.write_back_pieces(spec, pieces, tmp_path / "pieces")
    assert by_pieces.read_bytes() == whole.read_bytes()
    assert whole.read_bytes().count(b"\n") == 6
