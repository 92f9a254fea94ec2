"""NPAI: La Poste return reasons, flags on the address as sent, clearing with history."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config.schema import text_dtype
from mdm_pipeline.normalize import npai

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("N'habite pas à l'adresse indiquée", "INCONNU"),
        ("Destinataire inconnu à l'adresse", "INCONNU"),
        ("NPAI", "INCONNU"),
        ("Déménagé", "INCONNU"),
        ("Défaut d'accès ou d'adressage", "ADRESSAGE"),
        ("Boîte aux lettres inaccessible", "ADRESSAGE"),
        ("Adresse incomplète", "ADRESSAGE"),
        ("Pli refusé par le destinataire", "REFUSE"),
        ("Refusé", "REFUSE"),
        ("Pli avisé et non réclamé", "NON_RECLAME"),
        ("Non réclamé", "NON_RECLAME"),
        ("Décédé", "DECEDE"),
        ("???", "AUTRE"),
    ],
)
def test_reason_categories(text: str, code: str) -> None:
    assert npai.reason_code(pd.Series([text])).iloc[0] == code


def _returns(*rows):
    return pd.DataFrame(
        rows, columns=["source", "source_key", "return_date", "reason_code", "reason_label"]
    )


def test_flag_targets_the_address_as_sent_and_clears_on_change() -> None:
    ret = _returns(
        ("s", "1", "2026-10-01", "INCONNU", "x"), ("s", "9", "2026-10-01", "REFUSE", "y")
    )
    current = pd.DataFrame(
        {"source": ["s", "s"], "source_key": ["1", "2"], "address_hash": ["new", "b"]}
    )
    sent = pd.DataFrame({"source": ["s"], "source_key": ["1"], "address_hash": ["old"]})
    state = npai.update_flags(npai.empty_state(), ret, current, sent, "R1")
    # Record 1 was mailed at "old" and has already moved: flagged, then cleared at once.
    assert state[["source_key", "address_hash", "cleared_run"]].values.tolist() == [
        ["1", "old", "R1"]
    ]
    assert state["cleared_reason"].iloc[0] == "address changed"
    # Record 9 is unknown: no address, no flag.
    assert npai.current_flags(state).empty


def test_flag_holds_while_the_address_is_unchanged_then_clears() -> None:
    ret = _returns(("s", "1", "2026-10-01", "INCONNU", "x"))
    current = pd.DataFrame({"source": ["s"], "source_key": ["1"], "address_hash": ["a"]})
    night1 = npai.update_flags(npai.empty_state(), ret, current, current, "R1")
    assert npai.current_flags(night1)["source_key"].tolist() == ["1"]
    night2 = npai.update_flags(night1, ret, current, current, "R2")  # same file again
    assert len(night2) == 1 and night2["cleared_run"].isna().all()
    moved = current.assign(address_hash="b")
    night3 = npai.update_flags(night2, ret, moved, current, "R3")
    assert night3["cleared_run"].tolist() == ["R3"] and npai.current_flags(night3).empty
    assert night3["flagged_run"].tolist() == ["R1"]  # history kept


def _npai_rows(url: str) -> pd.DataFrame:
    engine = sa.create_engine(url)
    frame = pd.read_sql("select * from mdm_npai", engine)
    engine.dispose()
    return frame


def _stored_address_hash(frame: pd.DataFrame) -> list[str]:
    """The address hash as stores hold it: lines 2 to 6 joined by "|" in Python
    objects, pandas' hash of that text, written in decimal."""
    text = frame["rnvp_line2"].fillna("").astype(object)
    for i in range(3, 7):
        text = text + "|" + frame[f"rnvp_line{i}"].fillna("").astype(object)
    return (
        pd.util.hash_pandas_object(text, index=False).to_numpy(dtype=np.uint64).astype(str).tolist()
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.none() | st.text(alphabet=st.sampled_from(list("A1 |é-")), max_size=6),
            min_size=5,
            max_size=5,
        ),
        max_size=20,
    )
)
def test_the_address_hash_is_the_one_earlier_runs_stored(rows: list[list[str | None]]) -> None:
    """A flag clears when the stored hash differs from the run's: the hash must be the
    one stores already hold, whatever the lines' dtype (Python objects or Arrow)."""
    frame = pd.DataFrame(rows, columns=[f"rnvp_line{i}" for i in range(2, 7)], dtype=object)
    expected = _stored_address_hash(frame)
    assert npai.address_hash(frame).tolist() == expected
    assert npai.address_hash(frame.astype(text_dtype())).tolist() == expected


def test_the_address_hash_of_a_known_address_never_changes() -> None:
    frame = pd.DataFrame(
        {
            "rnvp_line2": [None],
            "rnvp_line3": ["BAT B"],
            "rnvp_line4": ["12 RUE DE LA PAIX"],
            "rnvp_line5": [None],
            "rnvp_line6": ["75002 PARIS"],
        }
    )
    assert npai.address_hash(frame).tolist() == ["1650946786918257553"]


def test_two_nights_on_the_samples(samples: Path) -> None:
    cfg = str(samples / "config.yaml")
    first = json.loads(runner.invoke(app, ["run", "--config", cfg, "--json"]).stdout)
    returns = pd.read_csv(samples / "laposte_retours_npai.csv", sep=";", dtype=str)
    assert first["npai_returns_read"] == len(returns)
    assert first["npai_flags_active"] == first["npai_flags_new"] > 0
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    flagged = _npai_rows(url)
    assert set(flagged["reason_code"]) <= set(npai.REASONS)
    back = pd.read_csv(samples / "out" / "stores_return.csv", sep=";", encoding="cp1252", dtype=str)
    assert back["mdm_npai"].eq("True").sum() == (flagged["source"] == "stores").sum()

    # Night 2: one flagged store customer now lives elsewhere.
    key = flagged.loc[flagged["source"] == "stores", "source_key"].iloc[0]
    path = samples / "magasins_fidelite.csv"
    lines = path.read_text(encoding="cp1252").split("\n")
    header = lines[0].split(";")
    i = next(n for n, line in enumerate(lines) if line.startswith(key + ";"))
    fields = lines[i].split(";")
    moved = {
        "ADR1": "8 RUE DES NOUVEAUX",
        "ADR2": "",
        "ADR3": "",
        "ADR4": "",
        "CP": "42000",
        "VILLE": "ST ETIENNE",
    }
    for col, value in moved.items():
        fields[header.index(col)] = value
    lines[i] = ";".join(fields)
    path.write_text("\n".join(lines), encoding="cp1252")
    second = json.loads(runner.invoke(app, ["run", "--config", cfg, "--json"]).stdout)
    assert second["npai_flags_cleared"] == 1 and second["npai_flags_new"] == 0
    assert second["npai_flags_active"] == first["npai_flags_active"] - 1
    history = _npai_rows(url)
    assert len(history) == len(flagged)  # nothing deleted
    cleared = history[history["cleared_run"].notna()]
    assert cleared["source_key"].tolist() == [key]
    assert cleared["cleared_reason"].tolist() == ["address changed"]

    # Night 3: a store customer never returned moves, and tonight's return file names
    # them: the letter went to the address the store held (as sent), which they have
    # already left, so the flag is recorded on it and cleared at once.
    other = next(
        k
        for k in (line.split(";")[0] for line in lines[1:] if line)
        if k not in set(history["source_key"]) and k != key
    )
    engine = sa.create_engine(url)
    sent_hash = pd.read_sql(
        sa.text(
            "select address_hash from mdm_source_records"
            " where source = 'stores' and source_key = :k"
        ),
        engine,
        params={"k": other},
    )["address_hash"].item()
    engine.dispose()
    i = next(n for n, line in enumerate(lines) if line.startswith(other + ";"))
    fields = lines[i].split(";")
    for col, value in moved.items():
        fields[header.index(col)] = value
    lines[i] = ";".join(fields)
    path.write_text("\n".join(lines), encoding="cp1252")
    back_file = samples / "laposte_retours_npai.csv"
    with back_file.open("a", encoding="utf-8") as f:
        f.write(f"stores;{other};03/03/2026;Destinataire inconnu à l'adresse\n")
    third = json.loads(runner.invoke(app, ["run", "--config", cfg, "--json"]).stdout)
    assert third["npai_flags_new"] == 1 and third["npai_flags_cleared"] == 1
    assert third["npai_flags_active"] == second["npai_flags_active"]
    row = _npai_rows(url).set_index("source_key").loc[other]
    assert row["address_hash"] == sent_hash
    assert row["cleared_run"] == row["flagged_run"] == third["run_id"]
