"""The load stage shared with a child process: the same mapped sources as a load in one
process, the first error in the config's order, and a child that fails leaves its
share to this process."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdm_pipeline.config.errors import SourceError
from mdm_pipeline.golden_records.snapshot_child import BATCH_GC_THRESHOLDS
from mdm_pipeline.golden_records.zygote import ForkedChild, Zygote
from mdm_pipeline.normalize.stage import normalize_records
from mdm_pipeline.pipeline import loading
from mdm_pipeline.pipeline.run import Pipeline
from mdm_pipeline.sources import MappedSource, load_source

DAY = pd.Timestamp("2026-11-22")


def _assert_same(got: list[MappedSource], want: list[MappedSource]) -> None:
    assert [m.source for m in got] == [m.source for m in want]
    for g, w in zip(got, want, strict=True):
        for part in ("records", "raw", "quarantine", "deleted"):
            left, right = getattr(g, part), getattr(w, part)
            if isinstance(left, pd.DataFrame):
                pd.testing.assert_frame_equal(left, right, check_exact=True, obj=part)
            else:
                pd.testing.assert_series_equal(left, right, check_exact=True, obj=part)
        assert (g.location, g.rows_read, g.duplicates, g.fingerprint) == (
            w.location,
            w.rows_read,
            w.duplicates,
            w.fingerprint,
        )


def test_each_sources_hashes_are_those_of_all_the_records_together(samples: Path) -> None:
    """A record's `source_hash` is computed with its own source's records, where the
    source is loaded: it must be the hash the records all together give (what the
    store holds from earlier runs)."""
    settings = Pipeline.from_config(samples / "config.yaml").settings
    mapped = loading.load_sources(settings, DAY, lambda m: None)
    together = pd.concat(
        [load_source(spec, settings, DAY).records for spec in settings.sources], ignore_index=True
    )
    got = pd.concat([m.records["source_hash"] for m in mapped], ignore_index=True)
    pd.testing.assert_series_equal(got, loading.source_hashes(together), check_names=False)
    assert got.nunique() == len(got)


def test_normalised_text_leaves_normalisation_as_arrow_strings(samples: Path) -> None:
    """Every normalised column that holds text leaves normalisation in the stages' text
    dtype, not as a Python object per value: the sources are handed back from the load's
    child and held through the run as Arrow buffers."""
    from mdm_pipeline.normalize.stage import NORMALISED_COLUMNS
    from mdm_pipeline.sources.mapping import TEXT

    settings = Pipeline.from_config(samples / "config.yaml").settings
    for mapped in loading.load_sources(settings, DAY, lambda m: None, normalised=True):
        records = mapped.records
        objects = [c for c in [*NORMALISED_COLUMNS, "quality_codes"] if records[c].dtype == object]
        assert objects == [], mapped.source
        assert records["phone_norm"].dtype == TEXT and records["city_norm"].dtype == TEXT


@pytest.fixture
def forking() -> Iterator[Zygote]:
    """A night's forking process (here a program of its own: the test has threads)."""
    zygote = Zygote.start()
    assert zygote is not None
    yield zygote
    zygote.close()


@pytest.mark.parametrize("forked", [False, True], ids=["started", "forked"])
@pytest.mark.parametrize("normalised", [False, True])
def test_a_load_shared_with_a_child_maps_what_one_process_maps(
    samples: Path,
    normalised: bool,
    forked: bool,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    settings = Pipeline.from_config(samples / "config.yaml").settings
    sizes = [loading._file_bytes(s, settings) for s in settings.sources]
    assert loading.shared_out(sizes, 0), "the samples must send a source to the child"
    children: list[object] = []
    real = loading._Child.__init__

    def spy(self: loading._Child, *args: object) -> None:
        real(self, *args)  # type: ignore[arg-type]
        children.append(self.process)

    monkeypatch.setattr(loading._Child, "__init__", spy)
    seen: list[str] = []
    got = loading.load_sources(
        settings,
        DAY,
        lambda m: seen.append(m.source),
        min_bytes=0,
        start_bytes=0,
        normalised=normalised,
        zygote=request.getfixturevalue("forking") if forked else None,
    )
    # A night's load forks its child from the night's forking process, if there is one.
    assert [isinstance(c, ForkedChild) for c in children] == [forked]
    want = [loading._load_hashed(spec, settings, DAY) for spec in settings.sources]
    if normalised:
        # What the normalise stage makes of all the records together, source by source.
        together = normalize_records(
            pd.concat([m.records for m in want], ignore_index=True), settings.normalize
        )
        bounds = np.cumsum([0, *(len(m.records) for m in want)])
        want = [
            replace(m, records=together.iloc[a:b].set_axis(m.records.index))
            for m, a, b in zip(want, bounds[:-1], bounds[1:], strict=True)
        ]
        assert "email_norm" in got[0].records.columns
    _assert_same(got, want)
    assert sorted(seen) == sorted(s.name for s in settings.sources)


def test_small_extracts_are_loaded_here(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Pipeline.from_config(samples / "config.yaml").settings

    def no_child(*args: object) -> None:
        raise AssertionError("a child started for small extracts")

    monkeypatch.setattr(loading, "_Child", no_child)
    got = loading.load_sources(settings, DAY, lambda m: None)
    assert [m.source for m in got] == [s.name for s in settings.sources]


@given(st.lists(st.one_of(st.none(), st.integers(0, 10**9)), max_size=8), st.integers(0, 10**8))
def test_sources_are_shared_out_evenly_with_one_at_least_loaded_here(
    sizes: list[int | None], start: int
) -> None:
    away = loading.shared_out(sizes, start)
    assert away == sorted(set(away))
    assert all(sizes[i] is not None for i in away)  # SQL sources and missing files stay
    assert len(away) < max(len(sizes), 1)
    if away:  # each side within one source (or the start-up) of the other
        there = start + sum(sizes[i] or 0 for i in away)
        here = sum(s or 0 for i, s in enumerate(sizes) if i not in away)
        assert abs(here - there) <= max([start, *(s or 0 for s in sizes)])


def test_four_extracts_are_shared_by_size() -> None:
    """The scale benchmark's extracts: e-commerce's here, the stores' and the call
    centre's in the child (the B2B Parquet file, small, here)."""
    mib = 2**20
    sizes = [52_738_112, 43_794_844, 28_839_562, 3_074_562]
    assert loading.shared_out(sizes, 8 * mib) == [1, 2]
    assert loading.shared_out([None, 40 * mib, 30 * mib], 8 * mib) == [2]


def test_the_childs_normalisation_is_handed_back_when_it_evens_the_sides() -> None:
    """The scale benchmark's extracts: the child's two sides outweigh e-commerce's, and
    the call centre's normalisation (the smaller of the two) evens them out best."""
    mib = 2**20
    sizes = [52_738_112, 43_794_844, 28_839_562, 3_074_562]
    assert loading.handed_back(sizes, [1, 2], 8 * mib) == [2]
    # Sides already even, or the child's the lighter: nothing is handed back.
    assert loading.handed_back([50 * mib, 42 * mib], [1], 8 * mib) == []
    assert loading.handed_back([80 * mib, 20 * mib], [1], 8 * mib) == []
    assert loading.handed_back(sizes, [], 8 * mib) == []


def test_on_a_night_the_childs_hashing_is_handed_back_when_it_evens_the_sides() -> None:
    """The scale benchmark's extracts on a night (nothing normalised in the load): the
    stores' hash, the larger, evens the sides best."""
    mib = 2**20
    sizes = [52_738_112, 43_794_844, 28_839_562, 3_074_562]
    assert loading.handed_back(sizes, [1, 2], 8 * mib, loading.HASH_SHARE) == [1]


@given(
    st.lists(st.integers(0, 10**9), min_size=2, max_size=8),
    st.integers(0, 10**8),
    st.sampled_from([loading.NORMALISE_SHARE, loading.HASH_SHARE]),
)
def test_a_source_handed_back_shortens_the_longer_side(
    sizes: list[int], start: int, share: float
) -> None:
    away = loading.shared_out(list(sizes), start)
    handed = loading.handed_back(list(sizes), away, start, share)
    assert len(handed) <= 1 and set(handed) <= set(away)
    there = start + sum(sizes[i] for i in away)
    here = sum(s for i, s in enumerate(sizes) if i not in away)
    if handed:
        moved = share * sizes[handed[0]]
        assert max(here + moved, there - moved) < max(here, there)


def test_a_source_handed_back_is_normalised_here_as_the_child_would(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that hands a source back: every source comes out as the load in one
    process gives it, normalised, the handed one included."""
    settings = Pipeline.from_config(samples / "config.yaml").settings
    monkeypatch.setattr(loading, "shared_out", lambda sizes, start: [1, 2])
    monkeypatch.setattr(loading, "handed_back", lambda sizes, away, start, share: [2])
    normalised: list[int] = []
    real = loading.normalize_records

    def counted(records: pd.DataFrame, settings: object) -> pd.DataFrame:
        normalised.append(len(records))
        return real(records, settings)

    monkeypatch.setattr(loading, "normalize_records", counted)
    got = loading.load_sources(
        settings, DAY, lambda m: None, min_bytes=0, start_bytes=0, normalised=True
    )
    monkeypatch.setattr(loading, "normalize_records", real)
    want = [loading._load_hashed(spec, settings, DAY, True) for spec in settings.sources]
    _assert_same(got, want)
    # Here: sources 0 and 3, and the call centre's handed back by the child.
    assert sorted(normalised) == sorted(len(want[i].records) for i in (0, 2, 3))


def test_a_source_handed_back_on_a_night_is_hashed_here_as_the_child_would(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A night's load (nothing normalised) whose child hands a source back: every
    source comes out as the load in one process gives it, hashed; the handed one's
    hash is computed here."""
    settings = Pipeline.from_config(samples / "config.yaml").settings
    monkeypatch.setattr(loading, "shared_out", lambda sizes, start: [1, 2])
    monkeypatch.setattr(loading, "handed_back", lambda sizes, away, start, share: [1])
    hashed: list[int] = []
    real = loading.source_hashes

    def counted(records: pd.DataFrame) -> pd.Series:
        hashed.append(len(records))
        return real(records)

    monkeypatch.setattr(loading, "source_hashes", counted)
    got = loading.load_sources(settings, DAY, lambda m: None, min_bytes=0, start_bytes=0)
    monkeypatch.setattr(loading, "source_hashes", real)
    want = [loading._load_hashed(spec, settings, DAY) for spec in settings.sources]
    _assert_same(got, want)
    assert "street_norm" not in got[1].records.columns
    # Here: sources 0 and 3, and the stores' handed back by the child.
    assert sorted(hashed) == sorted(len(want[i].records) for i in (0, 1, 3))


@pytest.mark.parametrize(("in_child", "handed"), [(1, []), (2, []), (1, [1]), (2, [2])])
def test_the_first_failing_source_in_order_is_reported_wherever_it_was_loaded(
    samples: Path, monkeypatch: pytest.MonkeyPatch, in_child: int, handed: list[int]
) -> None:
    """Two extracts without a header line: the error names the first of them in the
    config, whether the child or this process loaded it, or the child was to hand it
    back."""
    settings = Pipeline.from_config(samples / "config.yaml").settings
    for spec in settings.sources[1:3]:
        settings.resolve(spec.path).write_bytes(b"")
    monkeypatch.setattr(loading, "shared_out", lambda sizes, start: [in_child])
    monkeypatch.setattr(loading, "handed_back", lambda sizes, away, start, share: handed)
    with pytest.raises(SourceError) as failed:
        loading.load_sources(
            settings, DAY, lambda m: None, min_bytes=0, start_bytes=0, normalised=True
        )
    assert "source 'stores'" in str(failed.value)
    assert "no header line" in str(failed.value)


#: A load child that writes more to its standard error than a pipe holds (a run with
#: debug logging) while it maps its sources.
_NOISY = """
import sys
from pathlib import Path
from mdm_pipeline.pipeline import loading
mapped = loading._load_hashed
def noisy(*args, **kwargs):
    sys.stderr.write("x" * 300_000)
    sys.stderr.flush()
    return mapped(*args, **kwargs)
loading._load_hashed = noisy
loading._main(Path(sys.argv[1]))
"""


@pytest.mark.timeout(120)
def test_a_forked_child_that_writes_much_to_its_error_output_does_not_stop(
    samples: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its standard error goes to a file: a pipe nobody reads while the run waits for
    the sources it hands back first would stop it for ever."""
    (tmp_path / "noisy_load.py").write_text(_NOISY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the forking program finds it
    monkeypatch.setattr(loading, "MODULE", "noisy_load")
    settings = Pipeline.from_config(samples / "config.yaml").settings
    zygote = Zygote.start()
    assert zygote is not None
    try:
        with caplog.at_level(logging.WARNING, logger=loading.__name__):
            got = loading.load_sources(
                settings,
                DAY,
                lambda m: None,
                min_bytes=0,
                start_bytes=0,
                normalised=True,
                zygote=zygote,
            )
    finally:
        zygote.close()
    assert [m.source for m in got] == [s.name for s in settings.sources]
    assert "loaded here" not in caplog.text  # the child answered


@pytest.mark.parametrize("forked", [False, True], ids=["started", "forked"])
def test_a_child_that_fails_leaves_its_sources_to_this_process(
    samples: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    forked: bool,
    request: pytest.FixtureRequest,
) -> None:
    settings = Pipeline.from_config(samples / "config.yaml").settings
    monkeypatch.setattr(loading, "MODULE", "mdm_pipeline.no_such_module")
    zygote = request.getfixturevalue("forking") if forked else None
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        got = loading.load_sources(
            settings, DAY, lambda m: None, min_bytes=0, start_bytes=0, zygote=zygote
        )
    assert "its sources are loaded here" in caplog.text
    _assert_same(got, [loading._load_hashed(spec, settings, DAY) for spec in settings.sources])


def test_the_childs_log_lines_are_logged_here(
    samples: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the child logs (here: its answer, read back) is logged again in this process,
    under the logger it was logged to."""
    settings = Pipeline.from_config(samples / "config.yaml").settings
    real = loading._Child.answer

    def answer(self: loading._Child) -> loading._Answer | None:
        got = real(self)
        assert got is not None
        got.logged.append(("mdm_pipeline.sources.mapping", logging.WARNING, "source 'x': note"))
        return got

    monkeypatch.setattr(loading._Child, "answer", answer)
    with caplog.at_level(logging.WARNING):
        loading.load_sources(settings, DAY, lambda m: None, min_bytes=0, start_bytes=0)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("mdm_pipeline.sources.mapping", "source 'x': note")
    ]


def test_the_child_collects_what_it_logs_and_each_failure(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's own loop, run here: a source that logs has its line in the answer,
    a source that fails is named as failed (this process then loads it again)."""
    import pickle

    settings = Pipeline.from_config(samples / "config.yaml").settings
    settings.resolve(settings.sources[2].path).write_bytes(b"")
    real = loading.load_source

    thresholds: set[tuple[int, int, int]] = set()

    def logging_load(spec: object, settings: object, run_date: object) -> object:
        thresholds.add(gc.get_threshold())
        logging.getLogger("mdm_pipeline.sources").warning("source '%s': read", spec.name)
        return real(spec, settings, run_date)

    monkeypatch.setattr(loading, "load_source", logging_load)
    with open(tmp_path / "job.pickle", "wb") as handle:
        pickle.dump((settings, DAY, [1, 2, 3], True, [3]), handle)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        loading._main(tmp_path)
    finally:
        gc.set_threshold(*before)
    # It collects cyclic garbage as rarely as the run does.
    assert thresholds == {BATCH_GC_THRESHOLDS}
    with open(tmp_path / loading.ANSWER, "rb") as handle:
        answer = pickle.load(handle)
    assert list(answer.mapped) == [1]
    assert "street_norm" in answer.mapped[1].records.columns  # normalised, as asked
    assert answer.failed == [2]
    assert answer.logged == [
        ("mdm_pipeline.sources", logging.WARNING, "source 'stores': read"),
        ("mdm_pipeline.sources", logging.WARNING, "source 'callcentre': read"),
    ]
    # The source handed back, in its own answer: mapped and hashed, not normalised.
    with open(tmp_path / loading.EARLY, "rb") as handle:
        early = pickle.load(handle)
    assert list(early.mapped) == [3] and not early.failed
    assert "source_hash" in early.mapped[3].records.columns
    assert "street_norm" not in early.mapped[3].records.columns
    assert early.logged == [("mdm_pipeline.sources", logging.WARNING, "source 'b2b': read")]


def test_on_a_night_the_child_hands_a_source_back_mapped_only(
    samples: Path, tmp_path: Path
) -> None:
    """The child's loop for a night's load (nothing normalised): the source it hands
    back comes without its hash, which this process computes; the others with it."""
    import pickle

    settings = Pipeline.from_config(samples / "config.yaml").settings
    with open(tmp_path / "job.pickle", "wb") as handle:
        pickle.dump((settings, DAY, [1, 2], False, [1]), handle)
    loading._main(tmp_path)
    with open(tmp_path / loading.EARLY, "rb") as handle:
        early = pickle.load(handle)
    with open(tmp_path / loading.ANSWER, "rb") as handle:
        answer = pickle.load(handle)
    assert list(early.mapped) == [1] and list(answer.mapped) == [2]
    assert "source_hash" not in early.mapped[1].records.columns
    assert "source_hash" in answer.mapped[2].records.columns
    assert "street_norm" not in answer.mapped[2].records.columns
