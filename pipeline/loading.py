"""The load stage on both cores: large extracts shared between this process and a child.

Mapping, hashing and normalising an extract is largely Python-level work around
pandas and Arrow calls, which holds the GIL: a thread would not run beside it.
A full run over a million records spends about thirty seconds of one core
there (the CSV parsing itself, in Arrow, about two). So, when the extract files are
large (`PARALLEL_LOAD_MIN_BYTES`), the sources are shared out by file size
between this process and one child process (`python -m` this module), which
maps (and hashes) its share with the very same code and hands the mapped sources
back pickled, exactly as they were built (dtypes included), through a file
in memory (`/dev/shm` where the system has it).

A full run also normalises each source where it was loaded (`normalised`):
normalisation is a record's own business (the same values whichever records
it is done with), and it is as long as the load itself, so it takes the
second core too instead of following the load on one. Sources are whole
units of work, so the two sides can end far apart; the child then hands one
of its sources back mapped only (`handed_back`), first and in an answer of
its own, and this process normalises it (on a night, when nothing is
normalised in the load, hashes it) once its own share is done.

The result is the sequential load's: the sources in the config's order, and,
when several fail, the error of the first of them in that order. A child
that cannot start or dies, for any reason, leaves its share to this process:
a parallel load is a speed-up, never a different answer. Anything the child
logs is logged again here.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from mdm_pipeline.config import schema
from mdm_pipeline.config.errors import MdmError
from mdm_pipeline.config.settings import CsvSource, ParquetSource, Settings, Source
from mdm_pipeline.golden_records import store
from mdm_pipeline.golden_records.background import shared_folder
from mdm_pipeline.golden_records.snapshot_child import BATCH_GC_THRESHOLDS
from mdm_pipeline.golden_records.zygote import ForkedChild, Zygote
from mdm_pipeline.normalize.stage import normalize_records
from mdm_pipeline.sources import MappedSource, load_source

log = logging.getLogger(__name__)

#: Extract files' total size from which the load is shared with a child process: the
#: child costs about a second (starting Python, importing pandas), which the extracts
#: of a few hundred thousand records repay.
PARALLEL_LOAD_MIN_BYTES = 48 * 2**20
#: What a child's start-up is worth in bytes of extract when the sources are shared out
#: (about a second, at the 8-10 MB a second a CSV extract is read and mapped).
CHILD_START_BYTES = 8 * 2**20
MODULE = "mdm_pipeline.pipeline.loading"
#: The child's answer files: the sources it hands back (`handed_back`), then the rest.
EARLY, ANSWER = "early.pickle", "answer.pickle"
#: The child's standard error, in its folder (`_main`).
STDERR = "stderr.txt"


def _file_bytes(spec: Source, settings: Settings) -> int | None:
    """An extract file's size; None for a SQL source (read here: its size is unknown
    and its connection is this process's) or a file that is not there (this process
    reports it)."""
    if not isinstance(spec, CsvSource | ParquetSource):
        return None
    path = settings.resolve(spec.path)
    return path.stat().st_size if path.is_file() else None


def shared_out(sizes: list[int | None], start_bytes: int = CHILD_START_BYTES) -> list[int]:
    """The positions of the sources the child loads: the largest first, each to the
    side with less to do so far, the child's side starting at its start-up cost
    (`start_bytes`); a source of unknown size stays here, and so does one source at
    least."""
    here, there = 0, start_bytes
    away: list[int] = []
    known = sorted(
        ((size, i) for i, size in enumerate(sizes) if size is not None), key=lambda t: -t[0]
    )
    for size, i in known:
        if there < here:
            away.append(i)
            there += size
        else:
            here += size
    if len(away) == len(sizes):  # every source to the child: nothing to overlap
        return []
    return sorted(away)


#: Normalisation's share of a source's time when it is loaded and normalised: 3.9 to
#: 5.5 s of 7.2 to 10.2 s for the scale benchmark's three CSV extracts since Arrow
#: parses them (it was 0.4 when the csv module did).
NORMALISE_SHARE = 0.55
#: The hash's share of a source's time when it is loaded but not normalised (a night):
#: 0.55-0.65 s of 1.8-2.3 s for the e-commerce extract of a million records' benchmark.
HASH_SHARE = 0.3


def handed_back(
    sizes: list[int | None],
    away: list[int],
    start_bytes: int = CHILD_START_BYTES,
    share: float = NORMALISE_SHARE,
) -> list[int]:
    """The positions among `away` (the child's share) that the child maps and this
    process finishes (normalises, or on a night hashes): at most one, the one that
    best evens out the two sides, and only if it does. `share`: what finishing it
    weighs of its load (`NORMALISE_SHARE`, `HASH_SHARE`).

    Sources are indivisible, so the sides can be far apart (at a million records, 13
    s here against 21 s in the child, with four extracts; on a night, 2.2 s here
    against 3.2-4 s). The child maps the one it hands back first and sends it at
    once, while this process is still busy with its own share, so that the rest of
    its work can follow here.
    """
    if not away:
        return []
    there = start_bytes + sum(sizes[i] or 0 for i in away)
    here = sum(s or 0 for i, s in enumerate(sizes) if i not in away)
    best: int | None = None
    longest = float(max(here, there))
    for i in away:
        moved = share * (sizes[i] or 0)
        side = max(here + moved, there - moved)
        if side < longest:
            best, longest = i, side
    return [] if best is None else [best]


@dataclass
class _Answer:
    """What the child hands back: each source's mapped extract, or that it failed (this
    process loads it again and so raises the very error), and what it logged."""

    mapped: dict[int, MappedSource] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    logged: list[tuple[str, int, str]] = field(default_factory=list)


class _Child:
    """`python -m` this module on a folder holding the job; `answer` waits for it.

    Forked from the night's `zygote` when there is one: the program started anew
    spends most of a second importing pandas, pyarrow and the stages before it
    reads a row, at the head of the load, which the run then waits for."""

    def __init__(
        self,
        settings: Settings,
        run_date: pd.Timestamp,
        positions: list[int],
        normalised: bool,
        handed: list[int],
        zygote: Zygote | None = None,
    ) -> None:
        self.folder: str | None = None
        self.process: subprocess.Popen[bytes] | ForkedChild | None = None
        try:
            self.folder = shared_folder("mdm-load-")
            with open(Path(self.folder) / "job.pickle", "wb") as handle:
                job = (settings, run_date, positions, normalised, handed)
                pickle.dump(job, handle, protocol=5)
            if zygote is not None:
                self.process = zygote.spawn(MODULE, [self.folder], stdin=False)
            if self.process is not None:
                return
            # To a file, not a pipe: a child writing more than a pipe holds while this
            # process waits for its first answer would wait for ever.
            with open(Path(self.folder) / STDERR, "wb") as err:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", MODULE, self.folder],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
        except (OSError, pickle.PicklingError) as exc:
            log.warning("the load could not start a child process (%s)", exc.__class__.__name__)
            self.close()

    def early(self) -> _Answer | None:
        """The sources the child hands back to be finished here (normalised, or on a
        night hashed: `handed_back`), as soon as it has mapped them; None if it ends
        without them (they are then loaded here with the rest of what it did not
        answer)."""
        if self.process is None or self.folder is None:
            return None
        result = Path(self.folder) / EARLY
        while not result.is_file() and self.process.poll() is None:
            time.sleep(0.02)
        return self._read(result) if result.is_file() else None

    def answer(self) -> _Answer | None:
        """The child's answer, or None if it has none (it is then loaded here)."""
        if self.process is None or self.folder is None:
            return None
        if isinstance(self.process, subprocess.Popen):
            self.process.wait()
            piped = ""
        else:  # forked: what it wrote before its standard error went to the file
            _, piped = self.process.communicate()
        result = Path(self.folder) / ANSWER
        if self.process.returncode != 0 or not result.is_file():
            logged = Path(self.folder) / STDERR
            err = logged.read_bytes().decode("utf-8", "replace") if logged.is_file() else ""
            last = (piped + err).strip().splitlines()[-1:] or ["no message"]
            log.warning(
                "the load's child process failed (exit %s: %s): its sources are loaded here",
                self.process.returncode,
                last[0][:200],
            )
            return None
        return self._read(result)

    @staticmethod
    def _read(result: Path) -> _Answer | None:
        try:
            with open(result, "rb") as handle:
                answer: _Answer = pickle.load(handle)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            log.warning("the load's child process answered unreadably (%s)", type(exc).__name__)
            return None
        return answer

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def source_hashes(records: pd.DataFrame) -> pd.Series:
    """A hash of each record as its source sent it (mapped, before normalisation): an
    incremental run compares it with the stored one to find what a full extract changed.
    The line number is left out: a record that only moved in the file is unchanged.

    A 64-bit hash of the typed values, computed column by column in C (pandas'
    `hash_pandas_object`, through `schema.row_hashes`): it only has to tell a record
    from its own previous version, and serialising a million records to JSON to hash
    them cost more than loading them.
    """
    columns = [c for c in schema.CANONICAL_COLUMNS if c != schema.SOURCE_LINE]
    hashed = schema.row_hashes(records[columns])
    return pd.Series(store.hex_digests(hashed), index=records.index, dtype=object)


def _load_hashed(
    spec: Source,
    settings: Settings,
    run_date: pd.Timestamp,
    normalised: bool = False,
    hashed: bool = True,
) -> MappedSource:
    """A source read and mapped, its records with their `source_hash` (unless not
    `hashed`: `_take` adds it) and normalised if asked: a row's hash and
    normalised values are its own values' alone, so each source's are those of the
    records all together, and they are computed where the source is loaded (on
    either core)."""
    mapped = load_source(spec, settings, run_date)
    if not hashed:
        return mapped
    mapped.records["source_hash"] = source_hashes(mapped.records)
    if normalised:
        return replace(mapped, records=normalize_records(mapped.records, settings.normalize))
    return mapped


def load_sources(
    settings: Settings,
    run_date: pd.Timestamp,
    loaded: Callable[[MappedSource], None],
    min_bytes: int = PARALLEL_LOAD_MIN_BYTES,
    start_bytes: int = CHILD_START_BYTES,
    normalised: bool = False,
    zygote: Zygote | None = None,
) -> list[MappedSource]:
    """Every source read and mapped, its records with their `source_hash` (and their
    normalised columns with `normalised`), in the config's order; `loaded` is called
    for each as it is ready. Shared with a child process when the extract files hold
    `min_bytes` or more (see `shared_out` for `start_bytes`)."""
    specs = settings.sources
    sizes = [_file_bytes(spec, settings) for spec in specs]
    large = sum(s or 0 for s in sizes) >= min_bytes
    away = shared_out(sizes, start_bytes) if large else []
    handed = handed_back(sizes, away, start_bytes, NORMALISE_SHARE if normalised else HASH_SHARE)
    child = _Child(settings, run_date, away, normalised, handed, zygote) if away else None
    done: dict[int, MappedSource] = {}
    try:
        first_error: tuple[int, MdmError] | None = None
        for i, spec in enumerate(specs):
            if i in away:
                continue
            try:
                done[i] = _load_hashed(spec, settings, run_date, normalised)
            except MdmError as exc:
                # An earlier source the child loads may fail too: its error comes first.
                first_error = (i, exc)
                break
            loaded(done[i])
        # Finished here (normalised, or hashed) while the child goes on with the rest.
        early = child.early() if child is not None and handed else None
        _take(early, normalised, first_error, settings, done, loaded)
        answer = child.answer() if child is not None else None
    finally:
        if child is not None:
            child.close()
    for got in (early, answer):
        for name, level, message in got.logged if got is not None else []:
            logging.getLogger(name).log(level, "%s", message)
    _take(answer, False, first_error, settings, done, loaded)
    # What the child failed on (or all of its share, without an answer), loaded here in
    # order: an error is then raised here, as the sequential load raises it.
    for i in away:
        if i in done or (first_error is not None and i > first_error[0]):
            continue
        done[i] = _load_hashed(specs[i], settings, run_date, normalised)
        loaded(done[i])
    if first_error is not None:
        raise first_error[1]
    return [done[i] for i in range(len(specs))]


def _take(
    answer: _Answer | None,
    to_normalise: bool,
    first_error: tuple[int, MdmError] | None,
    settings: Settings,
    done: dict[int, MappedSource],
    loaded: Callable[[MappedSource], None],
) -> None:
    """The child's mapped sources into `done` (hashed here if the child did not, and
    normalised here if `to_normalise`), those before the first error this process
    met only."""
    if answer is None:
        return
    for i, mapped in answer.mapped.items():
        if first_error is None or i < first_error[0]:
            if "source_hash" not in mapped.records.columns:
                mapped.records["source_hash"] = source_hashes(mapped.records)
            if to_normalise:
                records = normalize_records(mapped.records, settings.normalize)
                mapped = replace(mapped, records=records)
            done[i] = mapped
            loaded(mapped)


class _Collect(logging.Handler):
    def __init__(self, into: list[tuple[str, int, str]]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((record.name, record.levelno, record.getMessage()))


def _main(folder: Path) -> None:
    """The child: load the job's sources, answer with each mapped (or its failure); the
    sources it hands back first, mapped only, in an answer of their own (`EARLY`).
    It collects cyclic garbage as rarely as the run does (`BATCH_GC_THRESHOLDS`).

    Its standard error goes to the job's folder however it was started: a forked
    child's is a pipe, which nobody reads while the parent waits for the early
    answer, and a child that filled it (a run with debug logging) would wait for
    ever."""
    err = os.open(folder / STDERR, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(err, 2)
    os.close(err)
    gc.set_threshold(*BATCH_GC_THRESHOLDS)
    with open(folder / "job.pickle", "rb") as handle:
        settings, run_date, positions, normalised, handed = pickle.load(handle)
    early, answer = _Answer(), _Answer()
    collect = _Collect(early.logged)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(collect)
    # Those handed back first, mapped (and, on a full run, hashed) only: the parent
    # normalises them, or on a night hashes them.
    rest = [i for i in positions if i not in handed]
    for part, share, norm, hashed in (
        (early, handed, False, normalised),
        (answer, rest, normalised, True),
    ):
        collect.into = part.logged
        for i in share:
            try:
                spec = settings.sources[i]
                part.mapped[i] = _load_hashed(spec, settings, run_date, norm, hashed)
            except MdmError:
                part.failed.append(i)
        if share or part is answer:
            # Whole or not at all: the parent reads a file as soon as it is there.
            name = ANSWER if part is answer else EARLY
            partial = folder / f"{name}.partial"
            with open(partial, "wb") as handle:
                pickle.dump(part, handle, protocol=5)
            partial.replace(folder / name)


if __name__ == "__main__":
    # Through the module's own name, not `__main__`: the answer's class must be found
    # under that name when this process unpickles it.
    from mdm_pipeline.pipeline.loading import _main as main

    main(Path(sys.argv[1]))
