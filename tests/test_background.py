"""The store's reads done in a child process (golden_records/background.py) give what
the store's own reads give, and fall back to them."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config import schema
from mdm_pipeline.config.loader import load_settings
from mdm_pipeline.golden_records import background, snapshot_child, store, store_child, zygote
from mdm_pipeline.golden_records.background import (
    EvidenceRead,
    Returns,
    ReturnsRead,
    ScopeRead,
    SnapshotRead,
)
from mdm_pipeline.pipeline import exports
from mdm_pipeline.pipeline import incremental as inc
from mdm_pipeline.pipeline.exports import RETURN_FIELDS

from .test_incremental import _returned, _state, day2

runner = CliRunner()
CONVERT = {"records": inc.RECORD_COLUMNS}


def _run(cfg: Path, url: str, *extra: str) -> None:
    result = runner.invoke(
        app, ["run", "--config", str(cfg), "--json", *extra], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output


def _assert_same(got: tuple | None, want: tuple | None) -> None:
    assert got is not None and want is not None
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys() and got[2].keys() == want[2].keys()
    for name in want[1]:
        pd.testing.assert_frame_equal(got[1][name], want[1][name], obj=name)
    for name, table in want[2].items():
        if isinstance(table, store.StoredRecords):
            assert got[2][name].rows.equals(table.rows)
            assert (got[2][name].at == table.at).all()
        else:
            assert isinstance(got[2][name], pa.Table) and got[2][name].equals(table)


@pytest.fixture(autouse=True)
def any_store_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """The samples' stores are far below the size read in the background by default."""
    monkeypatch.setattr(background, "BACKGROUND_MIN_BYTES", 0)


@pytest.fixture
def night_two(samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store after a full run and an incremental night that patched its snapshot (a
    base, a patch, a live index and the links: every kind of part), its night read in
    the background."""
    monkeypatch.setattr(inc, "PATCH_SHARE", 10.0)
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(samples / "config.yaml", url)
    day2(samples, 1)
    _run(samples / "config.yaml", url, "--incremental")
    return url


def test_the_child_process_reads_what_the_store_reads(night_two: str) -> None:
    engine = store.connect(night_two)
    want = store.read_snapshot(engine, CONVERT)
    assert want is not None and {"patch", "live"} <= _part_names(engine)
    pending = SnapshotRead(engine)
    folder = pending._child.folder
    assert pending._child.started and folder is not None  # a child was started
    got = pending.result(CONVERT)
    _assert_same(got, want)
    assert not Path(folder).exists()  # its files are gone once mapped
    # The hashes stay Arrow texts (a night reads a few), the keys become Python texts.
    records = got[1]["records"]
    assert records["source_hash"].dtype == records["address_hash"].dtype == schema.text_dtype()
    assert records["source_key"].dtype == object and records["source_hash"].notna().all()
    # Without `convert`, every column, as the store's own read.
    _assert_same(SnapshotRead(engine).result(), store.read_snapshot(engine))
    engine.dispose()


def _base_caches(url: str) -> list[Path]:
    """The files beside a store that hold its snapshot's base decoded."""
    path = Path(sa.make_url(url).database or "")
    return sorted(path.parent.glob(path.name + snapshot_child.BASE_CACHE_INFIX + "*"))


def test_the_snapshot_s_base_decoded_once_is_taken_from_beside_the_store(night_two: str) -> None:
    """The first read decodes the base into a file beside the store; the next one hands
    that file over instead of decoding it, with the same answer; a store whose base
    is written again (a full run) gets a new file, and the old one goes."""
    engine = store.connect(night_two)
    want = store.read_snapshot(engine, CONVERT)
    (left,) = _base_caches(night_two)  # the night read its snapshot in a child too
    left.unlink()
    _assert_same(SnapshotRead(engine).result(CONVERT), want)
    (cache,) = _base_caches(night_two)
    first = cache.stat()
    pending = SnapshotRead(engine)
    answer = pending._child.answer()
    assert answer is not None and answer["files"]["records"] == str(cache)
    pending.close()
    got = SnapshotRead(engine).result(CONVERT)
    _assert_same(got, want)
    assert cache.stat().st_mtime_ns == first.st_mtime_ns  # read, not written again
    engine.dispose()

    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    _run(samples / "config.yaml", night_two)  # a full run: a new base
    engine = store.connect(night_two)
    want = store.read_snapshot(engine, CONVERT)
    _assert_same(SnapshotRead(engine).result(CONVERT), want)
    (new,) = _base_caches(night_two)
    assert new != cache and not cache.exists()
    engine.dispose()


def _stored_base(url: str) -> tuple[pa.Table, str]:
    """The snapshot's base as a night decodes it from the store, and its file's name."""
    engine = store.connect(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(store.snapshot.c.part, store.snapshot.c.run_id, store.snapshot.c.data)
            .where(store.snapshot.c.name == snapshot_child.BASE)
            .order_by(store.snapshot.c.part)
        ).all()
    engine.dispose()
    table = pq.read_table(pa.BufferReader(b"".join(bytes(d) for _, _, d in rows)))
    path = sa.make_url(url).database or ""
    return table, snapshot_child.base_cache(path, [(p, r, len(d)) for p, r, d in rows])


def _assert_base_file(url: str) -> Path:
    """The one base file beside the store: the decoded base, schema and metadata too."""
    table, name = _stored_base(url)
    (cache,) = _base_caches(url)
    assert str(cache) == name
    got = background.map_table(str(cache))
    assert got.equals(table) and got.schema.equals(table.schema, check_metadata=True)
    return cache


def test_the_run_that_writes_a_base_leaves_it_decoded_for_the_next_night(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run writes its base's file itself, and so does a night that writes a new
    base (a compaction): the next night's child hands that file over, decoding and
    writing nothing."""
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(samples / "config.yaml", url)
    cache = _assert_base_file(url)
    written = cache.stat().st_mtime_ns
    engine = store.connect(url)
    want = store.read_snapshot(engine, CONVERT)
    pending = SnapshotRead(engine)
    answer = pending._child.answer()
    assert answer is not None and answer["files"]["records"] == str(cache)
    pending.close()
    _assert_same(SnapshotRead(engine).result(CONVERT), want)
    assert cache.stat().st_mtime_ns == written
    engine.dispose()

    monkeypatch.setattr(inc, "PATCH_SHARE", 0.0)  # every night writes a new base
    day2(samples, 1)
    _run(samples / "config.yaml", url, "--incremental")
    new = _assert_base_file(url)
    assert new != cache and not cache.exists()


def test_a_failed_run_s_base_file_is_never_taken(
    night_two: str, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run that fails after writing its base's file leaves a file named after a
    base the store does not hold: the next read decodes the stored base again, and
    its file replaces the failed run's."""
    engine = store.connect(night_two)
    want = store.read_snapshot(engine, CONVERT)
    engine.dispose()

    def fail(*_: object) -> None:
        raise RuntimeError("stopped after the snapshot")

    with monkeypatch.context() as patched:
        patched.setattr(store, "finish_run", fail)
        result = runner.invoke(
            app,
            ["run", "--config", str(samples / "config.yaml")],
            env={"MDM_STORE_URL": night_two},
        )
    assert result.exit_code != 0
    (orphan,) = _base_caches(night_two)  # the failed run's: the stored base's is gone
    engine = store.connect(night_two)
    _assert_same(SnapshotRead(engine).result(CONVERT), want)
    engine.dispose()
    assert _assert_base_file(night_two) != orphan and not orphan.exists()


def test_a_store_read_in_this_process_gets_no_base_file(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "BACKGROUND_MIN_BYTES", 2**40)
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(samples / "config.yaml", url)
    assert _base_caches(url) == []


def test_a_damaged_or_vanished_base_file_is_decoded_again(
    night_two: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = store.connect(night_two)
    want = store.read_snapshot(engine, CONVERT)
    (cache,) = _base_caches(night_two)
    cache.write_bytes(cache.read_bytes()[:1000])  # cut short: no footer
    _assert_same(SnapshotRead(engine).result(CONVERT), want)
    assert _base_caches(night_two) == [cache] and snapshot_child._readable(str(cache))
    # Gone between the child's answer and this process's read of it: read here.
    pending = SnapshotRead(engine)
    answer = pending._child.answer
    pending._child.answer = lambda: (answer(), cache.unlink())[0]  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger=background.__name__):
        _assert_same(pending.result(CONVERT), want)
    assert "could not be read" in caplog.text
    engine.dispose()


def test_a_base_file_that_cannot_be_written_leaves_the_base_in_the_child_s_folder(
    tmp_path: Path,
) -> None:
    table = pa.table({"a": [1, 2]})
    missing = str(tmp_path / "no such folder" / "store.sqlite-snapshot-0.arrow")
    assert not snapshot_child.keep_decoded_base(table, missing)
    assert list(tmp_path.iterdir()) == []
    kept = str(tmp_path / "store.sqlite-snapshot-1.arrow")
    for old in ("store.sqlite-snapshot-0.arrow", "store.sqlite-snapshot-1.arrow.9.partial"):
        (tmp_path / old).write_bytes(b"old")
    (tmp_path / "other.sqlite-snapshot-0.arrow").write_bytes(b"another store's")
    (tmp_path / "store.sqlite-snapshot-notes.txt").write_bytes(b"not one of them")
    assert snapshot_child.keep_decoded_base(table, kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other.sqlite-snapshot-0.arrow",
        "store.sqlite-snapshot-1.arrow",
        "store.sqlite-snapshot-notes.txt",
    ]
    assert background.map_table(kept).equals(table)


def _part_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(store.snapshot.c.name)).scalars())


def test_a_store_without_the_last_runs_snapshot_has_none(night_two: str, tmp_path: Path) -> None:
    # No snapshot at all: a store with its schema and nothing else.
    empty = store.connect(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert SnapshotRead(empty).result(CONVERT) is None
    empty.dispose()
    # A snapshot older than the last successful run: not the answer either.
    engine = store.connect(night_two)
    with engine.begin() as conn:
        conn.execute(sa.update(store.snapshot).values(run_id="an older run"))
    assert store.read_snapshot(engine, CONVERT) is None
    assert SnapshotRead(engine).result(CONVERT) is None
    engine.dispose()


def test_only_a_large_enough_sqlite_file_is_read_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert background.background_file(pg) is None
    assert background.background_file(sa.create_engine("sqlite://")) is None
    assert background.background_file(sa.create_engine(f"sqlite:///{tmp_path}/absent")) is None
    there = tmp_path / "there.sqlite"
    shutil.copy(Path(__file__), there)
    assert background.background_file(sa.create_engine(f"sqlite:///{there}")) == str(there)
    monkeypatch.setattr(background, "BACKGROUND_MIN_BYTES", there.stat().st_size + 1)
    assert background.background_file(sa.create_engine(f"sqlite:///{there}")) is None


def _scope_keys(engine: sa.Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Some stored records (the prefetch's input), and the keys a night would need:
    some of those records' golden records' members, records of other golden records,
    and a key the store does not hold."""
    with engine.connect() as conn:
        stored = pd.DataFrame(
            conn.execute(
                sa.select(
                    store.source_records.c.source,
                    store.source_records.c.source_key,
                    store.source_records.c.golden_id,
                ).order_by(store.source_records.c.golden_id, store.source_records.c.source_key)
            ).all(),
            columns=["source", "source_key", "golden_id"],
        )
    multi = stored[stored["golden_id"].duplicated(keep=False)]
    changed = multi.drop_duplicates("golden_id").head(5)[["source", "source_key"]]
    members = multi[multi["golden_id"].isin(multi["golden_id"].unique()[:3])]
    others = stored[~stored["golden_id"].isin(multi["golden_id"])].head(4)
    new = pd.DataFrame({"source": ["stores"], "source_key": ["never-stored"]})
    wanted = pd.concat(
        [members[["source", "source_key"]], others[["source", "source_key"]], new],
        ignore_index=True,
    )
    assert len(members) > 3 and len(others) == 4
    return changed, wanted


def _assert_same_scope(got: store.Scope, want: store.Scope) -> None:
    pd.testing.assert_frame_equal(got.records, want.records, obj="records")
    pd.testing.assert_frame_equal(got.golden, want.golden, obj="golden")


@pytest.mark.parametrize("ahead", [False, True], ids=["with-keys", "ahead-of-keys"])
def test_the_scope_read_early_and_completed_here_is_the_scope_read_here(
    night_two: str, ahead: bool
) -> None:
    engine = store.connect(night_two)
    changed, wanted = _scope_keys(engine)
    pending = ScopeRead(engine) if ahead else ScopeRead(engine, changed)
    if ahead:
        pending.start(changed)
    assert pending.started
    with engine.connect() as conn:
        got = pending.result(conn, wanted)
        want = store.read_scope(conn, wanted)
    _assert_same_scope(got, want)
    assert len(got.records) == len(wanted) - 1  # all but the key never stored
    engine.dispose()


def test_a_scope_the_child_answered_is_made_into_frames_before_it_is_asked_for(
    night_two: str,
) -> None:
    """The child's answer is converted by a thread of this process as soon as it is
    there: the run, asking for the scope once it has clustered, finds it ready."""
    engine = store.connect(night_two)
    changed, wanted = _scope_keys(engine)
    pending = ScopeRead(engine, changed)
    ready = pending._ready
    assert ready is not None
    deadline = time.monotonic() + 120
    while not ready.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    # Converted without being asked: the child has answered (and ends cleanly).
    assert ready.done() and ready.result() is not None
    assert pending._child._process is not None and pending._child._process.wait(60) == 0
    with engine.connect() as conn:
        got = pending.result(conn, wanted)
        want = store.read_scope(conn, wanted)
    _assert_same_scope(got, want)
    engine.dispose()


def test_a_scope_read_closed_while_its_answer_is_awaited_stops_child_and_thread(
    night_two: str,
) -> None:
    """A run that fails before it asks for the scope leaves no child, thread or files."""
    engine = store.connect(night_two)
    changed, _ = _scope_keys(engine)
    pending = ScopeRead(engine, changed)
    ready, process, folder = pending._ready, pending._child._process, pending._child.folder
    assert ready is not None and process is not None and folder is not None
    pending.close()
    assert ready.done()
    assert process.poll() is not None and not Path(folder).exists()
    pending.close()  # again: nothing left to do
    engine.dispose()


def test_cluster_scope_holds_every_member_of_the_records_golden_records(night_two: str) -> None:
    engine = store.connect(night_two)
    changed, _ = _scope_keys(engine)
    with engine.connect() as conn:
        scope = store.read_cluster_scope(conn, changed)
        ids = set(
            conn.execute(
                sa.select(store.source_records.c.golden_id).where(
                    sa.tuple_(store.source_records.c.source, store.source_records.c.source_key).in_(
                        list(changed.itertuples(index=False, name=None))
                    )
                )
            ).scalars()
        )
        members = store.read_scope(
            conn,
            pd.DataFrame(
                conn.execute(
                    sa.select(
                        store.source_records.c.source, store.source_records.c.source_key
                    ).where(store.source_records.c.golden_id.in_(ids))
                ).all(),
                columns=["source", "source_key"],
            ),
        )
    assert set(scope.golden["golden_id"]) == ids
    _assert_same_scope(scope, members)
    engine.dispose()


def test_merged_scopes_are_one_read_of_all_their_records(night_two: str) -> None:
    engine = store.connect(night_two)
    _, wanted = _scope_keys(engine)
    halves = [wanted.iloc[::2], wanted.iloc[1::2], wanted.iloc[:3]]  # one key read twice
    with engine.connect() as conn:
        got = store.merge_scopes([store.read_scope(conn, h) for h in halves])
        want = store.read_scope(conn, wanted)
    _assert_same_scope(got, want)
    engine.dispose()


def test_nights_read_in_the_background_equal_full_runs(
    samples: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The whole incremental run with both reads in children: the store a full run
    leaves, night after night (the patched snapshot included)."""
    monkeypatch.setattr(inc, "PATCH_SHARE", 10.0)
    started = []
    real = background._Child.__init__

    def spy(self: background._Child, *args: object, **kwargs: object) -> None:
        real(self, *args, **kwargs)  # type: ignore[arg-type]
        started.append(isinstance(self._process, zygote.ForkedChild))

    monkeypatch.setattr(background._Child, "__init__", spy)
    placed = []
    real_go = background._Child.go

    def go_spy(self: background._Child, *args: object, **kwargs: object) -> None:
        real_go(self, *args, **kwargs)  # type: ignore[arg-type]
        placed.extend(kwargs.get("placed", ()))  # type: ignore[arg-type]

    monkeypatch.setattr(background._Child, "go", go_spy)
    written_here: list[list[str]] = []
    real_files = exports.night_return_files

    def files_spy(specs: list, *args: object) -> list[Path]:
        written_here.append([spec.name for spec in specs])
        return real_files(specs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(exports, "night_return_files", files_spy)
    cfg = samples / "config.yaml"
    a, b = tmp_path / "incremental.sqlite", tmp_path / "full.sqlite"
    settings = load_settings(cfg)
    _run(cfg, f"sqlite:///{a}")
    for seed in (1, 2):
        shutil.copy(a, b)
        day2(samples, seed)
        # The second night's files are shared between the child and the run's process
        # (as on a night of full extracts of many rows).
        monkeypatch.setattr(exports, "RETURNS_SPLIT_ROWS", 0 if seed == 2 else 10**9)
        _run(cfg, f"sqlite:///{a}", "--incremental")
        nightly = tmp_path / f"night{seed}"
        shutil.copytree(samples / "out", nightly)
        _run(cfg, f"sqlite:///{b}")
        assert _state(f"sqlite:///{a}") == _state(f"sqlite:///{b}"), seed
        # Its return files (full extracts here) are the full run's, new golden records
        # named by their members.
        for path in sorted((samples / "out").glob("*_return.*")):
            pd.testing.assert_frame_equal(
                _returned(nightly / path.name, f"sqlite:///{a}", settings),
                _returned(path, f"sqlite:///{b}", settings),
                obj=f"{path.name}, night {seed}",
            )
    # The snapshot's, the scope's, the evidence's and the return files' reads, and the
    # return files' writer, nightly, each forked from the night's zygote.
    assert started == [zygote.available()] * 10
    # The stored rows the files need went from their reader to their writer as a file,
    # never copied by the run.
    assert placed == ["held", "held"]
    # The run's process wrote a share of the second night's files, the child the rest.
    assert len(written_here) == 1 and 0 < len(written_here[0]) < len(settings.sources)
    # Every child answered: nothing was done again in the run's own process.
    assert "this one" not in caplog.text and "written here" not in caplog.text


def _evidence_inputs(engine: sa.Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Touched records and a night's evidence for them: some stored pairs kept, one
    with another weight, one new pair, and the others gone."""
    with engine.connect() as conn:
        stored = pd.DataFrame(
            conn.execute(
                store._EVIDENCE_QUERY.order_by(*store._EVIDENCE_QUERY.selected_columns[:4])
            )
            .mappings()
            .all()
        )
    assert len(stored) >= 6
    touched = pd.concat(
        [
            stored[["left_source", "left_key"]].set_axis(["source", "source_key"], axis=1),
            stored[["right_source", "right_key"]].set_axis(["source", "source_key"], axis=1),
        ]
    ).head(6)
    evidence = stored.head(4).copy()
    evidence.loc[evidence.index[1], "weight"] += 0.5
    new = stored.head(1).assign(right_key="never-stored")
    return touched, pd.concat([evidence, new], ignore_index=True)


def _assert_same_changes(got: store.EvidenceChanges, want: store.EvidenceChanges) -> None:
    for name in ("gone", "fresh", "changed"):
        pd.testing.assert_frame_equal(getattr(got, name), getattr(want, name), obj=name)


@pytest.mark.parametrize("ahead", [False, True], ids=["with-inputs", "ahead-of-inputs"])
def test_the_evidence_compared_in_a_child_is_the_evidence_compared_here(
    night_two: str, ahead: bool
) -> None:
    engine = store.connect(night_two)
    touched, evidence = _evidence_inputs(engine)
    pending = EvidenceRead(engine) if ahead else EvidenceRead(engine, touched, evidence)
    if ahead:
        # The records first: the child reads their stored pairs, then waits for tonight's
        # evidence, and answers only once it has it.
        pending.start(touched)
        assert _waits_on_its_input(pending._child._process)
        assert pending._child._process.poll() is None
        pending.compare(evidence)
    assert pending._child.started
    with engine.connect() as conn:
        got = pending.result(conn)
        want = store.evidence_changes(conn, touched, evidence)
    _assert_same_changes(got, want)
    assert len(want.changed) == 1 and len(want.gone) and len(want.fresh) == 2
    engine.dispose()


def _snapshot_both(engine: sa.Engine, conn: sa.Connection) -> tuple:
    got = SnapshotRead(engine).result(CONVERT)
    return got, store.read_snapshot(engine, CONVERT), _assert_same


def _scope_both(engine: sa.Engine, conn: sa.Connection) -> tuple:
    changed, wanted = _scope_keys(engine)
    got = ScopeRead(engine, changed).result(conn, wanted)
    return got, store.read_scope(conn, wanted), _assert_same_scope


def _evidence_both(engine: sa.Engine, conn: sa.Connection) -> tuple:
    touched, evidence = _evidence_inputs(engine)
    got = EvidenceRead(engine, touched, evidence).result(conn)
    return got, store.evidence_changes(conn, touched, evidence), _assert_same_changes


def _scope_ahead_both(engine: sa.Engine, conn: sa.Connection) -> tuple:
    changed, wanted = _scope_keys(engine)
    pending = ScopeRead(engine)
    pending.start(changed)
    return pending.result(conn, wanted), store.read_scope(conn, wanted), _assert_same_scope


def _evidence_ahead_both(engine: sa.Engine, conn: sa.Connection) -> tuple:
    touched, evidence = _evidence_inputs(engine)
    pending = EvidenceRead(engine)
    pending.start(touched)
    pending.compare(evidence)
    got = pending.result(conn)
    return got, store.evidence_changes(conn, touched, evidence), _assert_same_changes


#: The sources read whole in the returns' tests, the one whose members are read.
_WHOLE, _MEMBERS = ["b2b", "ecommerce"], ["stores"]


def _returns_keys(engine: sa.Engine) -> pd.DataFrame:
    """Some stored records of every source, and one key the store does not hold."""
    with engine.connect() as conn:
        keys = pd.read_sql(
            "select source, source_key from mdm_source_records order by source_key", conn
        )
    picked = keys.groupby("source").head(7)
    unknown = pd.DataFrame({"source": ["stores"], "source_key": ["never-stored"]})
    return pd.concat([picked, unknown], ignore_index=True)


def _assert_same_returns(got: Returns, want: tuple, engine: sa.Engine) -> None:
    held, members = want
    assert got.held.equals(held), "held"
    pd.testing.assert_frame_equal(got.members, members, obj="members")
    with engine.connect() as conn:
        stored = pd.read_sql("select source, count(*) n from mdm_source_records group by 1", conn)
    whole = stored.set_index("source")["n"][_WHOLE]
    by_source = held.column("source").value_counts().to_pylist()
    counts = {c["values"]: c["counts"] for c in by_source}
    # The whole sources' every record, 7 of each other source's (and not the unknown key).
    assert counts == {**whole.to_dict(), "stores": 7, "callcentre": 7}
    assert held.schema.names == [*store.RETURNS_KEYS, *RETURN_FIELDS.names]
    assert set(members["source"]) == {"stores"} and len(members) >= 7


def _read_returns(engine: sa.Engine, keys: pd.DataFrame) -> ReturnsRead:
    pending = ReturnsRead(engine, RETURN_FIELDS, _WHOLE, _MEMBERS)
    pending.start(keys)
    return pending


def _returns_both(engine: sa.Engine, conn: sa.Connection) -> tuple:
    keys = _returns_keys(engine)
    got = _read_returns(engine, keys).result(conn)
    want = store.read_returns(conn, RETURN_FIELDS, keys, _WHOLE, _MEMBERS)
    return got, want, lambda g, w: _assert_same_returns(g, w, engine)


def test_the_returns_read_in_a_child_are_the_returns_read_here(night_two: str) -> None:
    engine = store.connect(night_two)
    keys = _returns_keys(engine)
    pending = _read_returns(engine, keys)
    assert pending._child.started
    with engine.connect() as conn:
        got = pending.result(conn)
        assert got.file is None  # not asked to keep it
        want = store.read_returns(conn, RETURN_FIELDS, keys, _WHOLE, _MEMBERS)
        _assert_same_returns(got, want, engine)
        # Kept: its file is moved into the folder named, and the table mapped from it.
        keep = Path(background.shared_folder("mdm-test-"))
        kept = _read_returns(engine, keys).result(conn, keep=str(keep))
        assert kept.file is not None and kept.file.parent == keep and kept.file.is_file()
        _assert_same_returns(kept, want, engine)
        shutil.rmtree(keep)
    engine.dispose()


@pytest.mark.parametrize(
    "both",
    [
        _snapshot_both,
        _scope_both,
        _evidence_both,
        _scope_ahead_both,
        _evidence_ahead_both,
        _returns_both,
    ],
    ids=["snapshot", "scope", "evidence", "scope-ahead", "evidence-ahead", "returns"],
)
# A child that exits with an error, and one that exits cleanly with no JSON answer.
@pytest.mark.parametrize("module", ["mdm_pipeline.no_such_module", "this"])
def test_a_failed_child_falls_back_to_reading_here(
    night_two: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    both: Callable[[sa.Engine, sa.Connection], tuple],
    module: str,
) -> None:
    for name in ("CHILD_MODULE", "STORE_CHILD_MODULE"):
        monkeypatch.setattr(background, name, module)
    engine = store.connect(night_two)
    with caplog.at_level(logging.WARNING, logger=background.__name__), engine.connect() as conn:
        got, want, assert_same = both(engine, conn)
    assert_same(got, want)
    assert "done in this one" in caplog.text
    engine.dispose()


def test_a_child_that_cannot_start_leaves_the_read_to_this_process(
    night_two: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError("no process to be had")

    monkeypatch.setattr(background.subprocess, "Popen", no_process)
    engine = store.connect(night_two)
    with caplog.at_level(logging.WARNING, logger=background.__name__):
        pending = SnapshotRead(engine)
        assert not pending._child.started and pending._child.folder is None
        got = pending.result(CONVERT)
    _assert_same(got, store.read_snapshot(engine, CONVERT))
    assert "could not start" in caplog.text
    engine.dispose()


def test_a_child_collects_cyclic_garbage_as_rarely_as_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every child answers through `serve`, which sets the run's thresholds first (a
    scope's read at 1M records spent a tenth of its time in collections)."""
    import gc
    import json

    from mdm_pipeline.golden_records import snapshot_child

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        status = snapshot_child.serve(lambda: {"thresholds": list(gc.get_threshold())}, [])
    finally:
        gc.set_threshold(*before)
    assert status == 0
    answer = json.loads(capsys.readouterr().out)
    assert tuple(answer["thresholds"]) == snapshot_child.BATCH_GC_THRESHOLDS != (700, 10, 10)


def test_a_child_s_answer_is_taken_when_it_comes_not_when_the_child_ends() -> None:
    """A child lets go of what it read after it answers (0.3-0.6 s of a night's scope
    and evidence children): the parent goes on with the answer meanwhile. This child
    answers, then waits for its input to end: it cannot have ended when its answer
    is taken."""
    import subprocess
    import sys

    from mdm_pipeline.golden_records import snapshot_child

    code = (
        "import sys; from mdm_pipeline.golden_records.snapshot_child import serve; "
        "serve(lambda: {'files': ['a']}, []); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answer, reason = snapshot_child.child_answer(child)
        assert (answer, reason) == ({"files": ["a"]}, "")
        assert child.poll() is None
    finally:
        snapshot_child.stop_child(child, None)
    assert child.poll() is not None
    # One that fails still gives its reason, once it has ended.
    failed = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stderr.write('KeyError\\n'); sys.exit(1)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert snapshot_child.child_answer(failed) == (None, "KeyError")


def _waits_on_its_input(process: object, seconds: float = 60) -> bool:
    """Whether the child comes to wait on a pipe (its standard input) within `seconds`,
    seen in /proc, still running; where the kernel hides what a process waits on,
    after 3 s."""
    wchan = Path(f"/proc/{process.pid}/wchan")  # type: ignore[attr-defined]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            seen = wchan.read_text()
        except OSError:  # the process ended
            return False
        if seen in ("", "0"):
            time.sleep(3)
            return True
        if "pipe" in seen:
            return True
        time.sleep(0.05)
    return False


def test_a_child_started_ahead_of_its_inputs_reads_the_store_only_once_it_has_them(
    night_two: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While it waits, the child holds nothing: a write commits beside it (SQLite
    would wait for a reader's lock), and its read is of the store as the write left
    it, as a read here is."""
    engine = store.connect(night_two)
    changed, wanted = _scope_keys(engine)
    pending = ScopeRead(engine)
    assert _waits_on_its_input(pending._child._process)
    rec = store.source_records.c
    key = wanted.iloc[0]
    with sa.create_engine(night_two, connect_args={"timeout": 2}).begin() as conn:
        done = conn.execute(
            store.source_records.update()
            .where(rec.source == key["source"], rec.source_key == key["source_key"])
            .values(record_hash="changed-while-it-waited")
        )
        assert done.rowcount == 1
    pending.start(changed)
    with caplog.at_level(logging.WARNING, logger=background.__name__), engine.connect() as conn:
        got = pending.result(conn, wanted)
        want = store.read_scope(conn, wanted)
    _assert_same_scope(got, want)
    assert "changed-while-it-waited" in got.records["record_hash"].tolist()
    assert "done in this one" not in caplog.text  # the child's answer, not a fallback
    engine.dispose()


def test_a_child_started_ahead_and_never_given_its_inputs_ends_without_a_read(
    night_two: str,
) -> None:
    """Closed before its inputs (a run that failed first), the child is stopped and its
    folder removed; one whose standard input ends without the word that hands them
    over exits with an error and reads nothing."""
    import subprocess
    import sys

    engine = store.connect(night_two)
    pending = EvidenceRead(engine)
    process, folder = pending._child._process, pending._child.folder
    assert process is not None and folder is not None and Path(folder).is_dir()
    assert _waits_on_its_input(process)
    # The evidence's child waits at a lower priority than this process's.
    nice = int(Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    assert nice == os.nice(0) + store_child.EVIDENCE_NICENESS
    pending.close()
    assert process.poll() is not None and not Path(folder).exists()
    store_file = background.background_file(engine)
    assert store_file is not None
    empty = background.shared_folder("mdm-test-")
    try:
        module, deferred = background.STORE_CHILD_MODULE, background.DEFERRED
        done = subprocess.run(
            [sys.executable, "-m", module, "scope", store_file, empty, deferred],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.strip().splitlines()[-1] == "EOFError"
        assert sorted(p.name for p in Path(empty).iterdir()) == []
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    engine.dispose()


def test_a_child_s_frames_come_back_exactly_as_pickles_and_tables_as_arrow(
    tmp_path: Path,
) -> None:
    """The scope's frames of Python objects travel as pickles (dtypes and values as
    they were, bytes included), Arrow tables as IPC files; a pickle that is not a
    frame is refused."""
    frame = pd.DataFrame(
        {
            "payload": [b'{"a":1}', b"{}"],
            "source_line": np.array([3, 4], dtype=np.int64),
            "valid_from": pd.to_datetime(["2026-12-07 03:00", "2026-12-06 00:00"]),
        }
    )
    pd.to_pickle(frame, tmp_path / "records.pickle")
    got = background.answer_frame(tmp_path / "records.pickle")
    pd.testing.assert_frame_equal(got, frame)
    assert got["payload"].tolist() == [b'{"a":1}', b"{}"]
    snapshot_child.write_table(pa.table({"k": ["x"]}), str(tmp_path / "t.arrow"))
    assert background.answer_frame(tmp_path / "t.arrow")["k"].tolist() == ["x"]
    pd.to_pickle([1, 2], tmp_path / "other.pickle")
    with pytest.raises(TypeError):
        background.answer_frame(tmp_path / "other.pickle")
