"""Source connectors and mapping: every row read ends as a record or in quarantine."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mdm_pipeline.config.errors import SourceError
from mdm_pipeline.config.schema import text_dtype
from mdm_pipeline.config.settings import Settings
from mdm_pipeline.sources import dates, load_source, mapping, readers, write_back
from mdm_pipeline.sources.mapping import split_full_name
from mdm_pipeline.sources.readers import LINE, read_source

RUN_DATE = pd.Timestamp("2026-11-22")


def _settings(tmp_path: Path, source: dict) -> Settings:
    return Settings.model_validate({"sources": [source], "base_dir": tmp_path})


def _csv_source(**over) -> dict:
    src = {
        "name": "bu",
        "format": "csv",
        "path": "x.csv",
        "encoding": "utf-8",
        "delimiter": ",",
        "mapping": {"source_key": "id", "last_name": "nom", "first_name": "prenom"},
    }
    src.update(over)
    return src


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1252", "latin-1"])
@pytest.mark.parametrize("delimiter", [",", ";", "|", "\t"])
def test_csv_encodings_and_delimiters(tmp_path: Path, encoding: str, delimiter: str) -> None:
    text = delimiter.join(["id", "nom", "prenom"]) + "\n"
    text += delimiter.join(["1", "Lefèvre", "Hélène"]) + "\n"
    text += delimiter.join(["2", "Œuvray" if encoding != "latin-1" else "Oeuvray", "Zoé"]) + "\n"
    (tmp_path / "x.csv").write_bytes(text.encode(encoding))
    settings = _settings(tmp_path, _csv_source(encoding=encoding, delimiter=delimiter))
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records["last_name"].tolist()[0] == "Lefèvre"
    assert mapped.records["first_name"].tolist() == ["Hélène", "Zoé"]
    assert mapped.records["source_line"].tolist() == [2, 3]
    assert mapped.quarantine.empty


def test_utf8_bom_declared_as_plain_utf8_still_finds_first_column(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_bytes("id,nom,prenom\n1,A,B\n".encode("utf-8-sig"))
    settings = _settings(tmp_path, _csv_source())
    assert load_source(settings.sources[0], settings, RUN_DATE).records["source_key"].tolist() == [
        "1"
    ]


def test_embedded_newlines_keep_physical_line_numbers(tmp_path: Path) -> None:
    text = (
        "id,nom,prenom,adresse\n"
        '1,A,B,"12 rue X\n75011 PARIS"\n'  # lines 2-3
        '2,C,D,"BAT B\n\n3 rue Y\n69003 LYON"\n'  # lines 4-7
        "\n"  # line 8: blank, not a row
        '3,E,F,"x",EXTRA\n'  # line 9: one field too many
        "4,G,H,z\n"  # line 10
    )
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    src = _csv_source()
    src["mapping"]["address_lines"] = "adresse"
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records["source_line"].tolist() == [2, 4, 10]
    assert mapped.records["address_lines"].iloc[1] == "BAT B\n\n3 rue Y\n69003 LYON"
    assert mapped.quarantine["line"].tolist() == [9]
    assert mapped.quarantine["reason"].iloc[0] == "expected 4 fields, found 5"
    assert mapped.rows_read == len(mapped.records) + len(mapped.quarantine) == 4


def test_bytes_invalid_in_declared_encoding_quarantine_the_row_only(tmp_path: Path) -> None:
    good = b"id,nom,prenom\n1,Durand,Jean\n"
    bad = "2,Lefèvre,Zoé\n".encode("cp1252")  # cp1252 bytes in a file declared UTF-8
    (tmp_path / "x.csv").write_bytes(good + bad + b"3,Petit,Luc\n")
    settings = _settings(tmp_path, _csv_source())
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records["source_key"].tolist() == ["1", "3"]
    assert mapped.quarantine["line"].tolist() == [3]
    assert "declared encoding utf-8" in mapped.quarantine["reason"].iloc[0]
    # The reason never carries the row's personal data.
    assert "Lef" not in mapped.quarantine["reason"].iloc[0]


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path, _csv_source())
    with pytest.raises(SourceError, match=r"x\.csv: source 'bu': file not found"):
        read_source(settings.sources[0], settings)


def test_mapping_dates_bools_constants_values_and_quarantine_reasons(tmp_path: Path) -> None:
    text = (
        "id;civ;nom;prenom;ne;optin;maj\n"
        "1;1;DURAND;Jean;31/12/1980;O;01/02/2026 10:00\n"
        "2;2;PETIT;Anne;31/02/1980;N;01/02/2026 10:00\n"  # impossible date
        ";2;MOREL;Luc;01/01/1990;;01/02/2026 10:00\n"  # empty key
        "4;2;ROUX;Eve;01/01/2090;peut-etre;01/02/2026 10:00\n"  # future date, bad bool
    )
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    src = _csv_source(delimiter=";", trust=5)
    src["mapping"] = {
        "source_key": "id",
        "civility": {"column": "civ", "values": {"1": "M", "2": "MME"}},
        "last_name": "nom",
        "first_name": "prenom",
        "birth_date": {"column": "ne", "format": "%d/%m/%Y", "on_invalid": "quarantine"},
        "consent_sms": "optin",
        "country": {"constant": "FR"},
        "source_updated_at": {"column": "maj", "format": "%d/%m/%Y %H:%M"},
    }
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    rec = mapped.records.iloc[0]
    assert rec["civility"] == "M" and rec["country"] == "FR" and rec["trust"] == 5
    assert rec["birth_date"] == pd.Timestamp("1980-12-31")
    assert rec["birth_date_raw"] == "31/12/1980"
    assert bool(rec["consent_sms"]) is True
    assert rec["source_updated_at"] == pd.Timestamp("2026-02-01 10:00")
    reasons = dict(zip(mapped.quarantine["line"], mapped.quarantine["reason"], strict=True))
    assert reasons == {
        3: "birth_date: value does not fit the declared format",
        4: "source_key: empty",
        5: "birth_date: value does not fit the declared format; "
        "consent_sms: value does not fit the declared format",
    }


def test_impossible_dates_become_null_with_a_quality_code_by_default(tmp_path: Path) -> None:
    text = "id,nom,prenom,ne\n1,A,B,31/02/1980\n2,C,D,01/01/2990\n3,E,F,01/02/1980\n"
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    src = _csv_source()
    src["mapping"]["birth_date"] = {"column": "ne", "format": "%d/%m/%Y"}
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.quarantine.empty and len(mapped.records) == 3
    assert mapped.records["birth_date"].isna().tolist() == [True, True, False]
    assert mapped.records["quality_codes"].fillna("").tolist() == [
        "BIRTH_DATE_INVALID",
        "BIRTH_DATE_INVALID",
        "",
    ]
    assert mapped.records["birth_date_raw"].iloc[0] == "31/02/1980"


def test_on_invalid_null_keeps_the_record(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("id,nom,prenom,ne\n1,A,B,99.99.1999\n", encoding="utf-8")
    src = _csv_source()
    src["mapping"]["birth_date"] = {"column": "ne", "format": "%d.%m.%Y", "on_invalid": "null"}
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert len(mapped.records) == 1 and pd.isna(mapped.records["birth_date"].iloc[0])
    assert mapped.records["birth_date_raw"].iloc[0] == "99.99.1999"


def test_duplicate_keys_latest_update_wins_others_quarantined(tmp_path: Path) -> None:
    text = (
        "id,nom,prenom,maj\n"
        "7,OLD,A,2025-01-01T00:00:00\n"
        "7,NEW,A,2026-01-01T00:00:00\n"
        "7,MID,A,2025-06-01T00:00:00\n"
        "8,X,Y,2025-06-01T00:00:00\n"
    )
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    src = _csv_source()
    src["mapping"]["source_updated_at"] = {"column": "maj"}
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records.set_index("source_key")["last_name"].to_dict() == {"7": "NEW", "8": "X"}
    assert mapped.duplicates == 2
    assert sorted(mapped.quarantine["line"]) == [2, 4]
    assert set(mapped.quarantine["reason"]) == {"duplicate source_key: superseded by line 3"}
    assert mapped.rows_read == len(mapped.records) + len(mapped.quarantine)


def test_records_kept_in_file_order_aligned_with_their_raw_rows(tmp_path: Path) -> None:
    """Quarantined rows (an empty key) and superseded duplicates taken out, the records
    stay in the file's order, numbered from 0, each beside its own raw row."""
    text = (
        "id,nom,prenom,maj\n"
        "9,A,A,2025-01-01T00:00:00\n"
        "7,OLD,B,2025-01-01T00:00:00\n"
        ",NOKEY,C,2025-01-01T00:00:00\n"
        "3,D,D,2024-01-01T00:00:00\n"
        "7,NEW,E,2026-01-01T00:00:00\n"
        "5,F,F,2023-01-01T00:00:00\n"
    )
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    src = _csv_source()
    src["mapping"]["source_updated_at"] = {"column": "maj"}
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    records = mapped.records
    assert records["source_key"].tolist() == ["9", "3", "7", "5"]
    assert records["source_line"].tolist() == [2, 5, 6, 7]
    assert records.index.equals(pd.RangeIndex(4))
    assert mapped.raw["nom"].tolist() == ["A", "D", "NEW", "F"]
    assert sorted(mapped.quarantine["line"]) == [3, 4]
    # Nothing to take out: the same columns and dtypes, every row.
    (tmp_path / "x.csv").write_text("id,nom,prenom,maj\n2,A,A,\n1,B,B,\n", encoding="utf-8")
    clean = load_source(settings.sources[0], settings, RUN_DATE)
    assert clean.records["source_key"].tolist() == ["2", "1"]
    assert clean.records.index.equals(pd.RangeIndex(2))
    assert clean.records.dtypes.equals(records.dtypes)
    assert clean.raw["nom"].tolist() == ["A", "B"]


def test_address_spread_over_columns_in_any_order(tmp_path: Path) -> None:
    text = "id,nom,prenom,A1,A2,A3\n1,A,B,,12 RUE X,BAT C\n2,C,D,APT 4,,3 AV Y\n"
    (tmp_path / "x.csv").write_text(text, encoding="utf-8")
    src = _csv_source()
    src["mapping"]["address_lines"] = {"columns": ["A1", "A2", "A3"]}
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records["address_lines"].tolist() == ["12 RUE X\nBAT C", "APT 4\n3 AV Y"]


@pytest.mark.parametrize(
    ("full", "first", "last"),
    [
        ("DUPONT Jean", "Jean", "DUPONT"),
        ("Jean Dupont", "Jean", "Dupont"),
        ("Dupont, Jean-Pierre", "Jean-Pierre", "Dupont"),
        ("Marie-Claire DE LA FONTAINE", "Marie-Claire", "DE LA FONTAINE"),
        ("MARTIN SOPHIE", "SOPHIE", "MARTIN"),
        ("dupont jean", "jean", "dupont"),
        ("Sophie Le Goff", "Sophie", "Le Goff"),
        ("  Jean   Martin ", "Jean", "Martin"),
    ],
)
def test_full_name_split(full: str, first: str, last: str) -> None:
    f, lst = split_full_name(pd.Series([full]), "auto")
    assert (f.iloc[0], lst.iloc[0]) == (first, last)


def test_full_name_declared_order() -> None:
    f, lst = split_full_name(pd.Series(["Dupont Jean", "Jean Dupont"]), "last_first")
    assert f.tolist() == ["Jean", "Dupont"] and lst.tolist() == ["Dupont", "Jean"]


def _split_full_name_in_pandas(full: pd.Series, order: str) -> tuple[pd.Series, pd.Series]:
    """`split_full_name` as it was written before its words went to Arrow: the oracle
    (each name's words exploded and grouped in pandas, Python objects throughout)."""
    from unidecode import unidecode

    from mdm_pipeline.config.reference import first_name_keys, surname_keys

    text = mapping._clean(full)
    first = pd.Series(None, index=full.index, dtype=object)
    last = pd.Series(None, index=full.index, dtype=object)
    present = text.notna()
    comma = present & text.str.contains(",", regex=False)
    parts = text[comma].str.split(",", n=1, expand=True)
    if comma.any():
        last[comma] = mapping._clean(parts[0])
        first[comma] = mapping._clean(parts[1])
    rest = present & ~comma
    if rest.any():
        words = text[rest].str.split(" ").explode()
        pos = words.groupby(level=0).cumcount()
        n_words = words.groupby(level=0).transform("size")
        is_upper = words.str.isupper() & (words.str.len() > 1)
        has_lower = words.str.contains(r"[a-zà-ÿ]", regex=True)
        mixed = is_upper.groupby(level=0).transform("any") & has_lower.groupby(level=0).transform(
            "any"
        )
        uniq = words.dropna().unique()
        keys = words.map(dict(zip(uniq, (unidecode(w).upper() for w in uniq), strict=True)))
        given_score = keys.isin(first_name_keys()).astype(int) - keys.isin(surname_keys())
        first_score = given_score.where(pos == 0, 0).groupby(level=0).transform("sum")
        last_score = given_score.where(pos == n_words - 1, 0).groupby(level=0).transform("sum")
        if order == "first_last":
            last_first = pd.Series(False, index=words.index)
        elif order == "last_first":
            last_first = pd.Series(True, index=words.index)
        else:
            last_first = last_score > first_score
        single = n_words == 1
        surname_word = np.where(
            mixed, is_upper, np.where(last_first, pos < n_words - 1, (pos >= 1) | single)
        )
        surname_word = pd.Series(surname_word, index=words.index).astype(bool)
        spaced = words + " "
        sur = spaced.where(surname_word, "").groupby(level=0).sum().str.strip()
        giv = spaced.where(~surname_word, "").groupby(level=0).sum().str.strip()
        last[rest] = sur.reindex(text[rest].index).replace("", None)
        first[rest] = giv.reindex(text[rest].index).replace("", None)
    return first, last


#: Words of full names: first names and surnames of the reference lists in their
#: cases, particles, initials, hyphens, accents, other scripts, blanks Python strips.
_NAME_WORDS = st.sampled_from(
    [
        "Jean",
        "JEAN",
        "jean",
        "Marie-Claire",
        "Dupont",
        "DUPONT",
        "Martin",
        "MARTIN",
        "de",
        "LA",
        "Le",
        "J.",
        "A",
        "É",
        "ÉLODIE",
        "Élodie",
        "Ñuñez",
        "ß",
        "\xa0",
        "\u2003",
        "O'NEIL",
    ]
) | st.text(st.characters(codec="utf-8", exclude_characters=" \t,"), min_size=1, max_size=6)
_FULL_NAMES = (
    st.none()
    | st.lists(_NAME_WORDS, min_size=1, max_size=5).map(" ".join)
    | (st.tuples(_NAME_WORDS, _NAME_WORDS).map(", ".join))
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FULL_NAMES, max_size=12), st.sampled_from(["auto", "first_last", "last_first"]))
@example(["Jean DUPONT", "DUPONT", "jean", "Marie Claire MARTIN", "\xa0 Jean", "Jean \xa0"], "auto")
@example(["Dupont Jean", "Jean Dupont", "Martin Marie-Claire", "dupont jean"], "auto")
def test_full_names_are_split_as_the_frames_of_words_split_them(names: list, order: str) -> None:
    full = pd.Series(names, dtype=object, index=pd.RangeIndex(len(names)) * 2 + 1)
    got, want = split_full_name(full, order), _split_full_name_in_pandas(full, order)
    for g, w in zip(got, want, strict=True):
        pd.testing.assert_series_equal(g, w)


def test_parquet_source(tmp_path: Path) -> None:
    pd.DataFrame({"id": [1, 2], "nom": ["A", None], "prenom": ["B", "C"]}).to_parquet(
        tmp_path / "x.parquet"
    )
    src = _csv_source(format="parquet", path="x.parquet")
    del src["encoding"], src["delimiter"]
    settings = _settings(tmp_path, src)
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records["source_key"].tolist() == ["1", "2"]
    assert mapped.records["source_line"].tolist() == [1, 2]
    assert pd.isna(mapped.records["last_name"].iloc[1])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.none() | st.datetimes(min_value=datetime(1800, 1, 1), max_value=datetime(2200, 1, 1)),
        max_size=30,
    ),
    st.sampled_from(["ns", "us", "ms"]),
)
@example([datetime(1969, 12, 31, 23, 59, 59, 500000), datetime(1900, 1, 1, 0, 0, 0, 999000)], "ns")
def test_a_parquet_datetime_is_written_as_pandas_writes_it(values: list, unit: str) -> None:
    """Datetimes of a Parquet or SQL extract become the text pandas' strftime gives:
    truncated to the second (before 1970 too), missing kept missing, any unit."""
    series = pd.Series(pd.to_datetime(values), dtype="datetime64[ns]").astype(f"datetime64[{unit}]")
    expected = series.dt.strftime(readers.ISO_SECONDS)
    got = readers._datetime_text(series)
    assert got.isna().tolist() == expected.isna().tolist()
    assert got.dropna().tolist() == expected.dropna().tolist()
    zoned = series.dt.tz_localize("Europe/Paris", ambiguous="NaT", nonexistent="NaT")
    pd.testing.assert_series_equal(
        readers._datetime_text(zoned), zoned.dt.strftime(readers.ISO_SECONDS)
    )


def _sql_source(url: str, **what) -> dict:
    return {
        "name": "crm",
        "format": "sql",
        "url": url,
        **what,
        "mapping": {"source_key": "id", "last_name": "nom", "first_name": "prenom"},
    }


def _fill(url: str) -> None:
    engine = sa.create_engine(url)
    pd.DataFrame(
        {"id": [10, 11, 12], "nom": ["A", "B", "C"], "prenom": ["x", "y", None], "actif": [1, 0, 1]}
    ).to_sql("clients", engine, index=False, if_exists="replace")
    engine.dispose()


def test_sql_table_and_query_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    _fill(url)
    for what, keys in (
        ({"table": "clients"}, ["10", "11", "12"]),
        ({"query": "select * from clients where actif = 1"}, ["10", "12"]),
    ):
        settings = _settings(tmp_path, _sql_source(url, **what))
        mapped = load_source(settings.sources[0], settings, RUN_DATE)
        assert mapped.records["source_key"].tolist() == keys


@pytest.mark.postgres
def test_sql_query_postgres(tmp_path: Path, pg_url: str) -> None:
    _fill(pg_url)
    settings = _settings(tmp_path, _sql_source(pg_url, query="select * from clients order by id"))
    mapped = load_source(settings.sources[0], settings, RUN_DATE)
    assert mapped.records["source_key"].tolist() == ["10", "11", "12"]
    assert pd.isna(mapped.records["first_name"].iloc[2])


def test_sql_error_is_one_line_source_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    _fill(url)
    settings = _settings(tmp_path, _sql_source(url, query="select * from nowhere"))
    with pytest.raises(SourceError, match=r"source 'crm': SQL read failed") as info:
        load_source(settings.sources[0], settings, RUN_DATE)
    assert "\n" not in str(info.value)


def test_reader_line_column_never_collides_with_extract_columns(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("id,nom,prenom\n1,A,B\n", encoding="utf-8")
    settings = _settings(tmp_path, _csv_source())
    raw = read_source(settings.sources[0], settings)
    assert LINE in raw.rows.columns and LINE.startswith("__")


def test_columns_beyond_the_guessed_header_width_are_still_text(tmp_path: Path) -> None:
    """The header's width is guessed from the file's first 64 KiB; a longer header
    must not leave its last columns to Arrow's type inference ("007" read as 7)."""
    names = [str(10**6 + i) for i in range(15_000)]  # numbers, as a pivot's header has
    (tmp_path / "x.csv").write_text(",".join(names) + "\n" + ",".join(["007"] * 15_000) + "\n")
    src = _csv_source(mapping={"source_key": names[-1]})
    extract = read_source(_settings(tmp_path, src).sources[0], _settings(tmp_path, src))
    assert extract.rows.drop(columns=[LINE]).iloc[0].tolist() == ["007"] * 15_000


def _csv_module_reading(data: bytes, encoding: str, delimiter: str) -> dict:
    """What Python's csv module reads of a file, as the reader reports it: the rows
    kept with their physical lines, the quarantined lines and reasons, the rows read.
    The reader used this module until Arrow's parser replaced it; it is the oracle."""
    import csv
    import io

    text = data.decode(encoding, "surrogateescape").removeprefix("\ufeff")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    width = len(rows[0])
    line = rows[0] and "\x1f".join(rows[0]).count("\n") + 2
    kept, quarantined, read = [], [], 0
    for row in rows[1:]:
        joined = "\x1f".join(row)
        if row:
            read += 1
            if len(row) != width:
                quarantined.append((line, f"expected {width} fields, found {len(row)}"))
            elif re.search("[\udc80-\udcff]", joined):
                reason = f"bytes not valid in declared encoding {encoding}"
                quarantined.append((line, reason))
            else:
                kept.append((line, row))
        line += joined.count("\n") + 1
    return {"kept": kept, "quarantined": quarantined, "rows_read": read}


#: Values of every kind a CSV parser can trip on: the delimiters, quotes, both kinds of
#: line end, blanks, accents, and `¤`, which the test turns into an undecodable byte.
_CSV_CHARS = list("ab ;,|\"\n\r\t'é¤")


@settings(max_examples=400, deadline=None)
@given(
    header=st.lists(
        st.sampled_from(["id", "nom", "prenom", "adr", "x"]), min_size=1, max_size=4, unique=True
    ),
    rows=st.lists(
        st.one_of(
            st.just(None),  # a blank line
            st.lists(st.text(alphabet=st.sampled_from(_CSV_CHARS), max_size=6), max_size=6),
            st.text(alphabet=st.sampled_from(_CSV_CHARS), max_size=12),  # a line as it is
        ),
        max_size=12,
    ),
    delimiter=st.sampled_from([",", ";", "|", "\t"]),
    encoding=st.sampled_from(["utf-8", "cp1252"]),
    ending=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
)
@example(
    header=["id", "nom"],
    rows=[None, ["1", 'a"b'], '2,"c\n\nd"', ",", "3,¤", None],
    delimiter=",",
    encoding="utf-8",
    ending="\n",
    bom=False,
)
def test_arrow_reads_a_csv_file_as_the_csv_module_does(
    tmp_path_factory: pytest.TempPathFactory,
    header: list[str],
    rows: list,
    delimiter: str,
    encoding: str,
    ending: str,
    bom: bool,
) -> None:
    """Rows kept, their physical lines, the rows quarantined (wrong width, bytes the
    encoding cannot decode) and the rows read are the csv module's, for quoted values
    with line ends, stray quotes, blank lines and lines of bare delimiters."""
    import csv
    import io

    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, lineterminator=ending)
    writer.writerow(header)
    for row in rows:
        if row is None:
            out.write(ending)
        elif isinstance(row, list):
            writer.writerow(row)
        else:
            out.write(row + ending)
    text = out.getvalue()
    undecodable = b"\xff" if encoding == "utf-8" else b"\x81"  # no character in either
    data = text.encode("utf-8" if encoding == "utf-8" else encoding).replace(
        "¤".encode("utf-8" if encoding == "utf-8" else encoding), undecodable
    )
    if bom and encoding == "utf-8":
        data = b"\xef\xbb\xbf" + data
    expected = _csv_module_reading(data, encoding, delimiter)

    folder = tmp_path_factory.mktemp("csv")
    (folder / "x.csv").write_bytes(data)
    src = _csv_source(encoding=encoding, delimiter=delimiter)
    extract = read_source(_settings(folder, src).sources[0], _settings(folder, src))
    values = extract.rows.drop(columns=[LINE])
    assert list(values.columns) == [h.strip() for h in header]
    kept = [
        (int(line), list(row))
        for line, row in zip(extract.rows[LINE], values.itertuples(index=False), strict=True)
    ]
    assert kept == expected["kept"]
    assert (
        list(zip(extract.quarantine["line"], extract.quarantine["reason"], strict=True))
        == (expected["quarantined"])
    )
    assert extract.rows_read == expected["rows_read"]
    # What is quarantined never keeps a byte that stands for an undecodable one.
    assert not any(re.search("[\U000f0000-\U000fffff]", r) for r in extract.quarantine["raw"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.just(float("nan")),
            # Every kind of blank Python strips (and some it does not), among letters.
            st.text(
                alphabet=st.sampled_from(list("aé Z\t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000\u200b"))
            )
            | st.text(max_size=8),
        ),
        max_size=40,
    )
)
# Runs of blanks to fold, with and without a tab (Arrow searches for both first).
@example(["a  b", "x\ty", " p \t q ", "one", None])
def test_cleaning_in_arrow_is_cleaning_in_python(values: list) -> None:
    """`_clean` (Arrow) strips, folds and empties exactly as Python's string methods do."""
    series = pd.Series(values, dtype=object, name="field")
    expected = mapping._clean_pandas(series)
    pd.testing.assert_series_equal(mapping._clean(series), expected)
    # A CSV extract's columns arrive as Arrow strings, and are cleaned the same way.
    text = series.astype(mapping.TEXT)
    pd.testing.assert_series_equal(mapping._clean(text), expected)


def test_the_blanks_arrow_trims_are_the_ones_python_strips() -> None:
    import sys

    every = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert every == mapping._WHITESPACE


def test_rows_kept_for_the_return_file_hold_text_as_arrow_strings(tmp_path: Path) -> None:
    """A CSV, SQL or Parquet extract's text columns are held compactly until written
    back; numbers stay numbers, and a Parquet extract's return file records its text
    columns as the Python texts pandas reads them as."""
    text = mapping.TEXT
    (tmp_path / "x.csv").write_text("id,nom,prenom\n1,A,B\n2,C,\n", encoding="utf-8")
    settings = _settings(tmp_path, _csv_source())
    raw = load_source(settings.sources[0], settings, RUN_DATE).raw
    assert raw.dtypes.tolist() == [text, text, text]
    assert raw["prenom"].tolist() == ["B", ""]

    url = f"sqlite:///{tmp_path / 'crm.db'}"
    _fill(url)
    settings = _settings(tmp_path, _sql_source(url, table="clients"))
    raw = load_source(settings.sources[0], settings, RUN_DATE).raw
    assert (raw.dtypes == text).all() and raw["prenom"].isna().tolist() == [False, False, True]
    mixed = pd.DataFrame({"n": [1, 2], "m": ["a", 3], "t": ["a", None], "e": [None, None]})
    kept = mapping._compact(mixed)
    assert kept.dtypes.tolist() == [mixed["n"].dtype, object, text, object]

    extract = pd.DataFrame({"id": ["1", "2"], "nom": ["A", "C"], "prenom": ["B", None]})
    extract.to_parquet(tmp_path / "x.parquet")
    src = _csv_source(format="parquet", path="x.parquet")
    del src["encoding"], src["delimiter"]
    settings = _settings(tmp_path, src)
    raw = load_source(settings.sources[0], settings, RUN_DATE).raw
    assert raw.dtypes.tolist() == [text, text, text]
    path = write_back(settings.sources[0], raw, pd.DataFrame({"golden_id": ["G1", "G2"]}), tmp_path)
    back = pd.read_parquet(path)
    assert back.dtypes.tolist() == [object] * 4
    pd.testing.assert_frame_equal(back[extract.columns], extract)
    metadata = pq.read_schema(path).pandas_metadata["columns"]
    assert [c["pandas_type"] for c in metadata] == ["unicode"] * 4


def test_a_frame_concatenated_from_sources_is_put_in_one_piece_in_place() -> None:
    """Records concatenated from several sources hold each Arrow column in chunks, which
    Arrow copies together at every take: after `in_one_piece` each is one array, with the
    same values and dtypes, and the other columns are left as they were."""
    import pyarrow as pa

    from mdm_pipeline.config.schema import in_one_piece, text_dtype

    part = pd.DataFrame(
        {
            "name": pd.Series(["Zoé", None, "Luc"], dtype=text_dtype()),
            "n": [1, 2, 3],
            "flag": pd.array([True, None, False], dtype="boolean"),
            "when": pd.to_datetime(["2024-01-02", None, "2025-03-04"]),
        }
    )
    frame = pd.concat([part, part.iloc[1:], part], ignore_index=True)
    before = frame.copy()
    assert pa.array(frame["name"].array).num_chunks == 3
    numbers = frame["n"].to_numpy()
    in_one_piece(frame)
    assert isinstance(pa.array(frame["name"].array), pa.Array)
    pd.testing.assert_frame_equal(frame, before)
    assert frame["n"].to_numpy() is numbers or np.shares_memory(frame["n"].to_numpy(), numbers)


#: Numbers as extracts write them and as they go wrong: padded or not, out of range,
#: a blank before a day, too many digits.
_NUMBERS = st.sampled_from(
    ["1", "01", "9", "12", "13", "29", "30", "31", "32", "00", " 5", "60", "61"]
)
_YEARS = st.sampled_from(["2020", "2019", "1900", "0000", "1600", "1677", "2262", "2263", "9999"])
_SEPARATORS = st.sampled_from(
    ["/", ".", "-", " ", "  ", "\t", "\x0b", "\x1c", "\xa0", ":", "T", "t"]
)
_DATE_TEXTS = (
    st.lists(
        st.one_of(_NUMBERS, _YEARS, _SEPARATORS, st.text("0123456789/. :", max_size=3)), max_size=12
    ).map("".join)
    | st.text(max_size=12)
    | st.none()
)
#: Formats read in Arrow, then some pandas reads alone (ISO, names of months, %f).
_FORMATS = [
    "%d/%m/%Y",
    "%d.%m.%Y",
    "%d/%m/%Y %H:%M",
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y",
    "%d-%m-%YT%H:%M",
    "le %d/%m/%Y",
    "%Y-%m-%d",
    "%d %b %Y",
    "%d/%m/%Y %H:%M:%S.%f",
    "%d%m%Y",
]


def _shaped(fmt: str) -> st.SearchStrategy[str]:
    """Texts in the shape of `fmt`: each directive a number that may not fit it, each
    separator the format's or another."""
    pieces = re.split(r"(%.)", fmt)
    parts = [
        (_YEARS if p == "%Y" else _NUMBERS) if p.startswith("%") else st.just(p) | _SEPARATORS
        for p in pieces
    ]
    return st.tuples(*parts).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_FORMATS).flatmap(
        lambda fmt: st.tuples(st.lists(_shaped(fmt) | _DATE_TEXTS, max_size=8), st.just(fmt))
    )
)
@example((["29/02/2020", "29/02/2019", "31/04/2020", " 5/03/2020", "05/03/2020 "], "%d/%m/%Y"))
@example((["01/01/2020 10:00:60", "31/12/2020 23:59:61", "1/2/2020\x1c7:5:9"], "%d/%m/%Y %H:%M:%S"))
@example((["21/09/1677", "20/09/1677", "11/04/2262", "12/04/2262", "01/01/0000"], "%d/%m/%Y"))
@example((["21/09/1677 00:12", "21/09/1677 00:13", "11/04/2262 23:47"], "%d/%m/%Y %H:%M"))
def test_dates_read_in_arrow_are_the_dates_pandas_reads(case: tuple[list, str]) -> None:
    """A format read in Arrow gives every value pandas' date (or its NaT), the days
    that do not exist, the dates beyond its range and the 60th second included."""
    texts, fmt = case
    text = pd.Series(texts, dtype=text_dtype(), index=pd.RangeIndex(len(texts)) * 2)
    text = text[text.str.lower().isin(["now", "today"]) != True]  # noqa: E712 (pandas' clock)
    want = pd.to_datetime(text, format=fmt, errors="coerce")
    if getattr(want.dt, "tz", None) is not None:
        want = want.dt.tz_convert("UTC").dt.tz_localize(None)
    got = dates.parse_dates(text, fmt)
    pd.testing.assert_series_equal(got, want.astype("datetime64[ns]"))


@pytest.mark.parametrize("fmt", ["%d/%m/%Y", "%d.%m.%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%m/%d/%Y"])
def test_each_field_s_edge_values_are_read_as_pandas_reads_them(fmt: str) -> None:
    """Every day, month and year of the edge values together (month lengths, leap
    years, pandas' range), then each time field's edge values in a valid date."""
    valid = {"%d": "15", "%m": "06", "%Y": "2020", "%H": "12", "%M": "30", "%S": "45"}
    pieces = re.split(r"(%.)", fmt)
    numbers = ["0", "00", "1", "01", "9", "12", "13", "23", "24", "28", "29", "30", "31"]
    numbers += ["32", "35", "59", "60", "61", "62", "99", " 5", "123"]
    years = ["2020", "2019", "2000", "1900", "0000", "1600", "1677", "1678", "2262", "2263"]

    def text(values: dict[str, str]) -> str:
        return "".join(values.get(p, valid.get(p, p)) for p in pieces)

    texts = [
        text({"%d": d, "%m": m, "%Y": y})
        for d in numbers
        for m in numbers
        for y in [*years, "20201", "202"]
    ]
    for field in ("%H", "%M", "%S"):
        texts += [text({field: n}) for n in numbers if field in pieces]
    frame = pd.Series(texts, dtype=text_dtype())
    want = pd.to_datetime(frame, format=fmt, errors="coerce")
    pd.testing.assert_series_equal(dates.parse_dates(frame, fmt), want)
    assert want.notna().sum() > 250  # dates among them, not only NaT


def test_which_formats_are_read_in_arrow() -> None:
    """Numeric fields each ended by a separator, and not ISO's order (pandas reads that
    as fast); anything else is pandas' to read."""
    for fmt in ["%d/%m/%Y", "%d.%m.%Y", "%d/%m/%Y %H:%M:%S", "%m/%d/%Y", "le %d/%m/%Y"]:
        assert dates.arrow_pattern(fmt) is not None, fmt
    for fmt in [
        "%Y-%m-%d",
        "%d%m%Y",
        "%d %b %Y",
        "%d/%m/%Y %H:%M:%S.%f",
        "%d/%m/%d",
        "%d/%m/%Y%z",
        "ISO8601",
        "à %d/%m/%Y",
    ]:
        assert dates.arrow_pattern(fmt) is None, fmt
    texts = pd.Series(["05/03/2020", "5/3/2020", "today", None], dtype=text_dtype())
    got = dates.parse_dates(texts, "%d/%m/%Y")
    assert got.iloc[:2].tolist() == [pd.Timestamp("2020-03-05")] * 2
    assert pd.notna(got.iloc[2]) and pd.isna(got.iloc[3])  # pandas' "today", left to it
