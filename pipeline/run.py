"""The nightly run: load → normalise → match → cluster → golden records → files back.

This is the only module that knows the order of the stages. It reports
progress through a callback (the CLI draws it), checks at run time that no
input row was lost, writes the store in one transaction and leaves a
manifest of the run.
"""

from __future__ import annotations

import gc
import io
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import make_url

from mdm_pipeline import __version__
from mdm_pipeline.config import schema
from mdm_pipeline.config.errors import ConfigError, DataContractError, StoreError
from mdm_pipeline.config.loader import config_hash, load_settings, matching_hash, store_url
from mdm_pipeline.config.settings import BlockingRule, Settings
from mdm_pipeline.golden_records import background, payloads, review, store
from mdm_pipeline.golden_records.background import (
    EvidenceRead,
    ReturnsRead,
    ScopeRead,
    SnapshotRead,
)
from mdm_pipeline.golden_records.jsonrows import json_rows
from mdm_pipeline.golden_records.snapshot_child import BATCH_GC_THRESHOLDS
from mdm_pipeline.golden_records.survivorship import survive
from mdm_pipeline.golden_records.zygote import Zygote
from mdm_pipeline.matching.blocking import candidate_pairs, true_pairs_kept
from mdm_pipeline.matching.clustering import guarded_clusters
from mdm_pipeline.matching.engine import AUTO, REVIEW, MatchResult, match, train
from mdm_pipeline.matching.evaluation import bcubed, pair_scores, read_truth
from mdm_pipeline.matching.keys import prepare
from mdm_pipeline.matching.scoring import Model
from mdm_pipeline.normalize import npai
from mdm_pipeline.normalize.stage import normalize_records
from mdm_pipeline.pipeline import exporting, report
from mdm_pipeline.pipeline import incremental as inc
from mdm_pipeline.pipeline.exporting import RETURN_COLUMNS, return_columns
from mdm_pipeline.pipeline.exports import RETURN_FIELDS, NightReturns
from mdm_pipeline.pipeline.loading import load_sources
from mdm_pipeline.pipeline.memory import PeakMemory
from mdm_pipeline.sources import MappedSource, check_columns, load_source, write_back
from mdm_pipeline.sources.npai import read_returns

log = logging.getLogger(__name__)

#: (stage, event, info): event is "start", "advance" or "end".
EventCallback = Callable[[str, str, dict[str, Any]], None]

STAGES = ("load", "normalize", "match", "cluster", "survive", "store", "export")


def _return_parts(records: pd.DataFrame, sizes: list[int]) -> Iterator[pd.DataFrame]:
    """Each source's records (`sizes[i]` rows of `records`, in the sources' order) with
    the columns `return_columns` reads but the golden ID. Only those columns are
    taken, source by source: the whole frame with its golden IDs beside it was a
    copy of every column's values, the run's peak at a million records."""
    wanted = [c for c in ("source_key", *RETURN_COLUMNS) if c in records.columns]
    offset = 0
    for size in sizes:
        yield records.iloc[offset : offset + size][wanted]
        offset += size


@dataclass
class SourceCounts:
    """Where every row of one source went."""

    name: str
    rows_read: int
    records: int
    quarantined: int
    duplicates: int


@dataclass
class RunSummary:
    """What the run did, for the CLI's table and the manifest."""

    run_id: str
    store: str
    sources: list[SourceCounts] = field(default_factory=list)
    candidate_pairs: int = 0
    pairs_per_rule: dict[str, int] = field(default_factory=dict)
    matched_edges: int = 0
    review_pairs: int = 0
    model_warnings: list[str] = field(default_factory=list)
    #: Active steward decisions (must-link, cannot-link) on records present tonight.
    decisions_honoured: int = 0
    clusters: int = 0
    largest_cluster: int = 0
    clusters_split: int = 0
    weak_links_cut: int = 0
    golden_created: int = 0
    golden_updated: int = 0
    golden_unchanged: int = 0
    golden_retired: int = 0
    merges: int = 0
    splits: int = 0

    def record_written(self, written: store.WriteResult) -> None:
        """What the store write changed, into the summary."""
        for name in (
            "golden_created",
            "golden_updated",
            "golden_unchanged",
            "golden_retired",
            "merges",
            "splits",
        ):
            setattr(self, name, getattr(written, name))

    #: "full", or "incremental" (only what changed is normalised and matched).
    mode: str = "full"
    records_changed: int = 0
    records_deleted: int = 0
    records_reclustered: int = 0
    #: The matching model: "trained" by this run, or "reused" from `model_run`.
    model_status: str = ""
    model_run: str = ""
    npai_returns_read: int = 0
    npai_flags_new: int = 0
    npai_flags_cleared: int = 0
    npai_flags_active: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    #: Each stage's own peak (`memory.PeakMemory`).
    peak_rss_by_stage: dict[str, float] = field(default_factory=dict)
    exports: list[str] = field(default_factory=list)
    #: The run report's HTML file (its JSON twin is beside it).
    report: str = ""


@dataclass
class BlockStats:
    """What blocking proposes, per rule, for `mdm block-stats`."""

    records: int
    candidate_pairs: int
    rules: dict[str, dict[str, int]] = field(default_factory=dict)
    true_pairs: int | None = None
    true_pairs_kept: int | None = None


@dataclass
class Evaluation:
    """Quality of the stored clusters against a truth file, for `mdm evaluate`."""

    records_in_store: int
    records_evaluated: int
    records_without_truth: int
    pair_precision: float
    pair_recall: float
    pair_f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    largest_cluster: int
    largest_true_cluster: int


def _entities(records: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """The true entity of each record; records the truth does not know are their own."""
    keyed = records[["source", "source_key"]].merge(truth, on=["source", "source_key"], how="left")
    own = "__record_" + pd.Series(np.arange(len(records))).astype(str)
    return keyed["entity_id"].fillna(own).to_numpy(dtype=object)


#: Records from which a full run collects cyclic garbage at each stage start.
COLLECT_FROM_RECORDS = 100_000


@contextmanager
def _batch_collection() -> Iterator[None]:
    """The cyclic garbage collector, run a hundred times less often while a run lasts
    (`BATCH_GC_THRESHOLDS`, which its child processes take too); the caller's own
    thresholds come back after."""
    before = gc.get_threshold()
    gc.set_threshold(*BATCH_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _noop(stage: str, event: str, info: dict[str, Any]) -> None:
    return None


def new_run_id(now: datetime) -> str:
    """Sortable by time, unique across concurrent starts. Microseconds included: two
    runs can start within one second (reports and "the last run" sort by ID), and an
    ID of the older second-only form still sorts before a newer one of its second."""
    return f"R{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}"


class Pipeline:
    """One configured deployment; `run()` executes the nightly job once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._model: dict[str, Any] = {}
        self._retrain = False
        self._memory = PeakMemory()
        self._collect_garbage = False

    @classmethod
    def from_config(cls, path: str | Path) -> Pipeline:
        """Load and validate the YAML configuration."""
        return cls(load_settings(path))

    def check_sources(self) -> None:
        """Every mapped column exists in its extract; raises ConfigError listing all that don't."""
        label = self.settings.config_path.name if self.settings.config_path else "config"
        errors: list[str] = []
        for i, spec in enumerate(self.settings.sources):
            errors += check_columns(spec, self.settings, label, i)
        if errors:
            raise ConfigError(errors)

    @contextmanager
    def _stage(
        self, name: str, summary: RunSummary, on_event: EventCallback, total: int | None = None
    ) -> Iterator[None]:
        on_event(name, "start", {"total": total})
        if self._collect_garbage:
            # What the last stage left in reference cycles (frames hold some) is freed
            # before this stage's peak is measured, not whenever the collector, run
            # less often during a run (`_batch_collection`), next gets to it.
            gc.collect()
        self._memory.start()
        t0 = time.perf_counter()
        yield
        summary.seconds[name] = round(time.perf_counter() - t0, 3)
        summary.peak_rss_by_stage[name] = round(self._memory.stop(), 1)
        on_event(name, "end", {"seconds": summary.seconds[name]})
        log.info("stage %s done in %.2fs", name, summary.seconds[name])

    def run(
        self,
        on_event: EventCallback | None = None,
        run_date: pd.Timestamp | None = None,
        retrain: bool = False,
        incremental: bool = False,
        zygote: Zygote | None = None,
    ) -> RunSummary:
        """Run the whole chain once; the store changes only if every stage succeeds.

        The matching model is trained on the first run (and whenever the matching
        settings change, or `retrain` is asked for) and reused on later runs: a
        night's new records do not shift the weights of every pair in the store.

        An incremental run forks its readers of the store from `zygote` if given
        (the caller made it before starting threads of its own, and closes it), else
        from one it starts (`background.start_zygote`).
        """
        self._retrain = retrain
        self._memory = PeakMemory()
        self._collect_garbage = False
        if retrain and incremental:
            raise ConfigError(
                "--retrain and --incremental cannot be combined: a retrained "
                "model rescores every pair, which is a full run"
            )
        emit = on_event or _noop
        settings = self.settings
        now = datetime.now(UTC)
        run_date = run_date or pd.Timestamp(now.date())
        url = store_url(settings)
        summary = RunSummary(
            run_id=new_run_id(now), store=make_url(url).render_as_string(hide_password=True)
        )
        self.check_sources()
        if settings.engine == "spark" and not incremental:
            # Before any work: a missing extra is known in a millisecond, not after
            # an hour of loading and normalising.
            from mdm_pipeline.matching.spark import check_installed

            check_installed()

        engine = store.connect(url)
        try:
            with store.run_lock(engine, summary.run_id), _batch_collection(), ExitStack() as done:
                if incremental:
                    # Started first, to import the readers' modules while the night
                    # begins: the night's readers of the store are forked from it.
                    if zygote is None:
                        zygote = background.start_zygote(engine)
                        if zygote is not None:
                            done.callback(zygote.close)
                    return self._run_incremental(summary, engine, emit, run_date, now, zygote)
                return self._run(summary, engine, emit, run_date, now, done)
        finally:
            engine.dispose()

    def _run(
        self,
        summary: RunSummary,
        engine: Any,
        emit: EventCallback,
        run_date: pd.Timestamp,
        now: datetime,
        done: ExitStack,
    ) -> RunSummary:
        """A full run; `done` closes what it starts in the background when it ends."""
        settings = self.settings
        delta_sources = [s.name for s in settings.sources if s.delta is not None]
        if delta_sources:
            held = store.records_per_source(engine)
            loaded_before = [name for name in delta_sources if held.get(name)]
            if loaded_before:
                raise ConfigError(
                    f"source '{loaded_before[0]}' delivers changes only (delta) and the store "
                    "already holds its records: run `mdm run --incremental`"
                )
        npai_before = store.read_npai(engine)
        # Each source normalised where it was loaded, on either core (see `loading`): the
        # load stage's time holds the normalisation, and the normalise stage the NPAI.
        mapped, returns, npai_quarantine = self._load(summary, emit, run_date, normalised=True)
        # Each with its `source_hash`, computed where the source was loaded.
        records = pd.concat([m.records for m in mapped], ignore_index=True)
        # `records` is a copy of the sources' frames: held beside it until the export,
        # they were a second million normalised records at the run's peak.
        sizes = [len(m.records) for m in mapped]
        # Nothing left of them: even an empty slice would hold its columns' memory.
        mapped = [replace(m, records=pd.DataFrame()) for m in mapped]
        schema.in_one_piece(records)
        # A collection costs tens of milliseconds whatever the run's size (the
        # interpreter's own objects); it frees gigabytes in a large full run only.
        self._collect_garbage = len(records) >= COLLECT_FROM_RECORDS

        with self._stage("normalize", summary, emit):
            records, npai_after = self._npai(engine, records, returns, npai_before, summary)

        payload_columns = list(inc.PAYLOAD_COLUMNS)
        with self._stage("match", summary, emit):
            # The records are final: their payloads are made on the other core while
            # this one matches, clusters and chooses golden records.
            made = self._payload_job(records, payload_columns, done)
            # Row i is record i; a copy of a million records only when it is not so already.
            positional = (
                records
                if records.index.equals(pd.RangeIndex(len(records)))
                else records.reset_index(drop=True)
            )
            fields = prepare(positional)
            model_hash = matching_hash(settings)
            stored = None if self._retrain else store.read_model(engine, model_hash)
            if stored is not None:
                summary.model_run, summary.model_status = stored[0], "reused"
                model = Model.from_json(stored[1])
            else:
                summary.model_run, summary.model_status = summary.run_id, "trained"
                model = train(fields, settings.matching)
            if settings.engine == "spark":
                from mdm_pipeline.matching.spark import match_spark

                result = match_spark(
                    positional, settings.matching, model, settings.spark, fields=fields
                )
            else:
                result = match(fields, settings.matching, model)
            self._model = model.as_dict()
        pairs = result.pairs
        summary.pairs_per_rule = {k: v.new_pairs for k, v in result.rule_stats.items()}
        summary.candidate_pairs = len(pairs)
        summary.matched_edges = int((pairs["band"] == AUTO).sum())
        summary.review_pairs = int((pairs["band"] == REVIEW).sum())
        summary.model_warnings = list(model.warnings)

        with self._stage("cluster", summary, emit):
            auto = pairs[pairs["band"] == AUTO]
            decided = review.active_decisions(engine)
            last = store.last_run(engine)
            since = review.decisions_changed_since(engine, last[1] if last else None)
            must, cannot = inc.decision_links(
                decided, inc.record_keys(positional) if len(decided) else pd.Index([])
            )
            cluster_ids, report = guarded_clusters(
                len(records), auto, settings.matching.clustering, must, cannot
            )
            summary.decisions_honoured = len(must) + len(cannot)
            labels = pd.Series(cluster_ids, index=records.index)
        summary.clusters = report.clusters
        summary.largest_cluster = report.largest
        summary.clusters_split = len(report.split_clusters)
        summary.weak_links_cut = report.bridges_cut
        # The candidate pairs, half a gigabyte at a million records, are let go as soon
        # as their evidence is made (the store stage's first step): the report needs
        # their weights only (a copy: a column of them is a view of all their floats).
        weights = pairs["weight"].to_numpy(copy=True)
        matched = [result]
        del result, pairs

        with self._stage("survive", summary, emit):
            golden, lineage = survive(records, labels, settings.survivorship)

        quarantined = pd.concat([m.quarantine for m in mapped] + npai_quarantine, ignore_index=True)
        quarantine_scope = [s.name for s in settings.sources] + (
            ["npai"] if settings.npai_returns else []
        )
        export_dir = settings.resolve(settings.export.dir)
        with _return_files(export_dir, summary) as (staging, staged):
            exports = self._export_job(mapped, sizes, records, staging, done)
            if exports is not None:  # the extracts' rows are the job's now
                mapped = [replace(m, raw=pd.DataFrame()) for m in mapped]
            with store.transaction(engine) as conn:
                with self._stage("store", summary, emit):
                    at = now.replace(tzinfo=None)
                    store.start_run(conn, summary.run_id, config_hash(settings), at)
                    # A first night's evidence is made and written in the time the
                    # connection waits for golden records. Not a later night's: compared
                    # there with the stored pairs, it held 400 MB more at a rerun's peak
                    # (at a million records) and gained no time.
                    evidence = store.EvidenceWrite(
                        conn, summary.run_id, lambda: _evidence(positional, matched.pop())
                    )
                    written, record_gid = store.write_run(
                        conn,
                        summary.run_id,
                        at,
                        records,
                        payload_columns,
                        labels,
                        golden,
                        lineage,
                        quarantined,
                        quarantine_scope,
                        steward=since,
                        payloads=made,
                        assigned=exports.golden_ids if exports is not None else None,
                        idle=evidence.steps() if last is None else None,
                    )
                    if made is not None:
                        made.close()  # its files, a gigabyte at a million records
                    # Written: their memory (half a gigabyte at a million records) is
                    # what the evidence and the snapshot take next.
                    del golden, lineage
                    if summary.model_status == "trained":
                        store.write_model(conn, summary.run_id, model_hash, at, model.to_json())
                    store.write_npai(conn, npai_before, npai_after)
                    evidence.finish()
                    store.write_snapshot(
                        conn,
                        summary.run_id,
                        _snapshot(
                            positional,
                            auto.reset_index(drop=True),
                            inc.block_keys(fields, settings.matching.blocking.rules),
                            settings.matching.blocking.rules,
                        ),
                    )
                summary.record_written(written)
                with self._stage("export", summary, emit, total=len(mapped)):
                    held_part: bytes | None = None
                    if exports is not None:
                        staged.extend(exports.files())
                        held_part = exports.held_part
                        exports.close()
                        for m in mapped:
                            emit("export", "advance", {"source": m.source})
                    elif settings.export.enabled:
                        paths, held_part = self._export(
                            mapped, sizes, records, record_gid, staging, emit
                        )
                        staged.extend(paths)
                    # What the first night reads back of the full extracts' records, as
                    # later nights read what the night before held: not their payloads.
                    store.write_held(conn, summary.run_id, [held_part] if held_part else [])
                summary.peak_rss_mib = round(self._memory.run_peak(), 1)
                store.finish_run(conn, summary.run_id, self._manifest(summary, mapped))
        self._report(summary, engine, records, weights, cluster_ids, quarantined)
        return summary

    def normalised_records(self, run_date: pd.Timestamp | None = None) -> pd.DataFrame:
        """Every source loaded and normalised, positionally indexed; the store is not touched."""
        self.check_sources()
        run_date = run_date or pd.Timestamp(datetime.now(UTC).date())
        mapped = [load_source(spec, self.settings, run_date) for spec in self.settings.sources]
        records = pd.concat([m.records for m in mapped], ignore_index=True)
        return normalize_records(records, self.settings.normalize).reset_index(drop=True)

    def block_stats(self, truth_path: Path | None = None) -> BlockStats:
        """Pairs per blocking rule and, with a truth file, the share of true pairs kept."""
        records = self.normalised_records()
        blocking = self.settings.matching.blocking
        cands = candidate_pairs(prepare(records), blocking.rules, blocking.max_block_size)
        stats = BlockStats(records=len(records), candidate_pairs=len(cands))
        for name, rule_stats in cands.stats.items():
            stats.rules[name] = asdict(rule_stats)
        if truth_path is not None:
            entity = _entities(records, read_truth(truth_path))
            kept, total = true_pairs_kept(cands, entity)
            stats.true_pairs, stats.true_pairs_kept = total, kept
            rules = np.asarray(cands.rule.codes)
            same = entity[cands.left] == entity[cands.right]
            for code, name in enumerate(cands.rule.categories):
                stats.rules[name]["true_pairs_new"] = int((same & (rules == code)).sum())
        return stats

    def evaluate(self, truth_path: Path) -> Evaluation:
        """Quality of the clusters in the store against a truth file."""
        truth = read_truth(truth_path)
        engine = store.connect(store_url(self.settings))
        try:
            with engine.connect() as conn:
                xref = store.previous_xref(conn)
        finally:
            engine.dispose()
        both = xref.merge(truth, on=["source", "source_key"], how="inner")
        pairs = pair_scores(both["golden_id"], both["entity_id"])
        b3 = bcubed(both["golden_id"], both["entity_id"])
        return Evaluation(
            records_in_store=len(xref),
            records_evaluated=len(both),
            records_without_truth=len(xref) - len(both),
            pair_precision=round(pairs.precision, 6),
            pair_recall=round(pairs.recall, 6),
            pair_f1=round(pairs.f1, 6),
            bcubed_precision=round(b3.precision, 6),
            bcubed_recall=round(b3.recall, 6),
            bcubed_f1=round(b3.f1, 6),
            largest_cluster=int(both["golden_id"].value_counts().max()) if len(both) else 0,
            largest_true_cluster=int(both["entity_id"].value_counts().max()) if len(both) else 0,
        )

    def _run_incremental(
        self,
        summary: RunSummary,
        engine: Any,
        emit: EventCallback,
        run_date: pd.Timestamp,
        now: datetime,
        zygote: Zygote | None = None,
    ) -> RunSummary:
        """Normalise and match only what changed since the last run (see `incremental`).

        Every record takes part through the store's snapshot (matching fields,
        hashes, auto-match links by position), read in one go; payloads are read
        back only for the records whose golden record is chosen again.
        """
        settings = self.settings
        summary.mode = "incremental"
        stored_model = store.read_model(engine, matching_hash(settings))
        if stored_model is None:
            raise StoreError(
                "an incremental run needs the matching model of a full run under these "
                "matching settings: run `mdm run` without --incremental first"
            )
        # The snapshot is fetched and decompressed by a second process while this one
        # loads the extracts (`background`). Only the columns needed for every
        # record become Python objects; the matching view stays in Arrow until a few
        # blocks need it (`inc.match_view`).
        pending = SnapshotRead(engine, zygote)
        # What the store holds of the rows the return files give back, read by another
        # process from now on: a full extract's every record while this one loads, a
        # delta extract's rows by key once the delta is known (`background`).
        returns_read = (
            ReturnsRead(
                engine,
                RETURN_FIELDS,
                exporting.held_sources(settings.sources),
                [s.name for s in settings.sources if s.delta is not None],
                zygote=zygote,
            )
            if settings.export.enabled and settings.export.incremental
            else None
        )
        try:
            summary.model_run, summary.model_status = stored_model[0], "reused"
            model = Model.from_json(stored_model[1])
            sources = [s.name for s in settings.sources]
            npai_before = store.read_npai(engine)
            mapped, returns, npai_quarantine = self._load(summary, emit, run_date, zygote=zygote)
            loaded = pd.concat([m.records for m in mapped], ignore_index=True)
            snap = pending.result(convert={"records": inc.RECORD_COLUMNS})
        except BaseException:
            if returns_read is not None:
                returns_read.close()
            raise
        finally:
            pending.close()
        if snap is None:
            raise StoreError(
                "an incremental run starts from the snapshot the last full run left in "
                "the store, and there is none: run `mdm run` without --incremental first"
            )
        # The stored records of the golden records that changed and deleted records
        # belong to, read by a second process while this one normalises, matches and
        # clusters (`background`): most of the scope survivorship reads. Its process is
        # started now, ahead of the keys it reads, to import its modules meanwhile.
        scope_read = ScopeRead(engine, zygote=zygote)
        state = snap[1]["records"]  # keys are text already (written so)
        deletions = pd.concat(
            [pd.DataFrame({"source": m.source, "source_key": m.deleted}) for m in mapped],
            ignore_index=True,
        )
        delta_sources = [s.name for s in settings.sources if s.delta is not None]
        delta = inc.find_delta(
            loaded,
            state,
            [s for s in sources if s not in delta_sources],
            deletions,
            inc.snapshot_keys(snap[2]["records"]),
        )
        summary.records_changed, summary.records_deleted = len(delta.changed), len(delta.deleted)
        scope_read.start(
            pd.concat([delta.changed[inc.KEYS], delta.deleted[inc.KEYS]], ignore_index=True)
        )
        # Tonight's evidence against the stored pairs of the records matched again or
        # deleted: read by a second process while this one matches, compared there
        # while this one clusters and chooses golden records (`background`), started
        # now, ahead of its inputs, to import its modules while this one normalises.
        evidence_read = EvidenceRead(engine, zygote=zygote)
        kept_pos = delta.unchanged["snap_pos"].to_numpy()
        # The delta extracts' unchanged rows, for the return files: read by key while
        # this process normalises and matches.
        if returns_read is not None:
            returns_read.start(delta.resent)
        # The return files' writer, a fifth child, started now ahead of its inputs.
        night_returns = (
            NightReturns(
                engine,
                [settings.source(m.source) for m in mapped],
                [m.raw for m in mapped],
                [m.records["source_key"] for m in mapped],
                zygote=zygote,
            )
            if returns_read is not None
            else None
        )

        with self._stage("normalize", summary, emit):
            changed = normalize_records(delta.changed, settings.normalize)
            changed = changed.assign(address_hash=npai.address_hash(changed))
            changed["source_key"] = changed["source_key"].astype(str)
            # NPAI over the delivered records that have a flag or a return tonight (no
            # other record's state can change): unchanged ones keep their stored
            # address. Found by position in the snapshot's key index, not by keying a
            # million delivered and stored records again.
            wanted = inc.record_keys(
                pd.concat(
                    [npai_before[inc.KEYS], *[r[inc.KEYS] for r in returns]], ignore_index=True
                ).astype(str)
            )
            at = delta.index.get_indexer(wanted)
            at = schema.distinct(at[at >= 0])
            address = [*inc.KEYS, "address_hash"]
            current_addr = inc.stack(
                [
                    inc.take_rows(state, kept_pos[np.isin(kept_pos, at)], address),
                    changed.loc[inc.record_keys(changed).isin(wanted), address],
                ]
            )
            flags, npai_after = self._npai_flags(
                current_addr,
                returns,
                npai_before,
                inc.take_rows(state, at, address).dropna(),
                summary,
            )
            changed = with_flags(changed, flags)

        with self._stage("match", summary, emit):
            # Tonight's line: a record that only moved in the file keeps its place in order.
            unchanged = inc.take_rows(
                state,
                kept_pos,
                inc.CURRENT_COLUMNS,
                source_line=delta.unchanged["source_line"].to_numpy(),
                snap_pos=kept_pos,
                changed_pos=-1,
                __changed=False,
            )
            fresh = inc.take_rows(
                changed,
                np.arange(len(changed)),
                inc.CURRENT_COLUMNS,
                npai_state=store.npai_state_text(changed).to_numpy(),
                snap_pos=delta.index.get_indexer(inc.record_keys(changed)),
                changed_pos=np.arange(len(changed)),
                __changed=True,
            )
            current = inc.run_order(inc.stack([unchanged, fresh]), sources)
            del unchanged  # a million rows, held for nothing after
            is_changed = current["__changed"].to_numpy(dtype=bool)
            # Each current record's row in the snapshot (-1: changed), and the changed
            # records' snapshot columns in current order: with the snapshot's Arrow
            # table, every record's matching view without converting the unchanged
            # ones, and the next snapshot.
            stored_pos = np.where(is_changed, -1, current["snap_pos"].to_numpy(dtype=np.int64))
            changed_rows = pd.concat(
                [
                    inc.take_rows(current, np.flatnonzero(is_changed), inc.CURRENT_COLUMNS),
                    inc.take_rows(
                        changed,
                        current["changed_pos"].to_numpy()[is_changed],
                        [*inc.HASH_COLUMNS, *store.MATCH_COLUMNS],
                    ),
                ],
                axis=1,
            )
            # Records whose NPAI state changed: re-survived, not re-matched.
            # Only a record flagged tonight or before can have changed: the others are
            # not looked up.
            no_flag = store.npai_state_text(with_flags(current[inc.KEYS].iloc[:1], flags.iloc[:0]))
            stored_state = current["npai_state"].fillna("").to_numpy()
            flagged = delta.index.get_indexer(inc.record_keys(flags))
            look = ~is_changed & (
                (stored_state != no_flag.iloc[0])
                | np.isin(current["snap_pos"].to_numpy(), flagged[flagged >= 0])
            )
            now_state = store.npai_state_text(with_flags(current.loc[look, inc.KEYS], flags))
            resurvive = np.zeros(len(current), dtype=bool)
            resurvive[look] = now_state.to_numpy() != stored_state[look]
            current.loc[look, "npai_state"] = now_state.to_numpy()
            old_pos = np.r_[
                delta.deleted["snap_pos"].to_numpy(dtype=np.int64),
                fresh.loc[fresh["snap_pos"] >= 0, "snap_pos"].to_numpy(dtype=np.int64),
            ]
            rules = settings.matching.blocking.rules
            block_now, block_old = inc.current_block_keys(
                snap[2]["records"], changed_rows, stored_pos, old_pos, rules
            )
            rematch, reach = inc.blocks_to_rematch(
                block_now, block_old, is_changed, settings.matching
            )
            # The stored pairs of the records matched again or deleted are read by the
            # evidence's child while this process matches them.
            evidence_read.start(
                pd.concat(
                    [current.loc[rematch, inc.KEYS], delta.deleted[inc.KEYS]], ignore_index=True
                )
            )
            # Only the blocks a record to match again is in: the same pairs as over everyone.
            part = np.flatnonzero(reach)
            result = match(
                inc.match_view(snap[2]["records"], changed_rows, stored_pos, part),
                settings.matching,
                model,
                only=rematch[part],
            )
            result.pairs["left"] = part[result.pairs["left"].to_numpy()]
            result.pairs["right"] = part[result.pairs["right"].to_numpy()]
            self._model = model.as_dict()
        evidence_read.compare(_evidence(current, result))
        pairs = result.pairs
        summary.candidate_pairs = len(pairs)
        summary.pairs_per_rule = {k: int(v) for k, v in pairs["rule"].value_counts().items()}
        summary.matched_edges = int((pairs["band"] == AUTO).sum())
        summary.review_pairs = int((pairs["band"] == REVIEW).sum())

        with self._stage("cluster", summary, emit):
            n = len(current)
            # Snapshot positions to tonight's: current records, then deleted ones after n.
            now_pos = np.full(len(state), -1, dtype=np.int64)
            snap_pos = current["snap_pos"].to_numpy(dtype=np.int64)
            stored_here = snap_pos >= 0
            now_pos[snap_pos[stored_here]] = np.flatnonzero(stored_here)
            now_pos[delta.deleted["snap_pos"].to_numpy(dtype=np.int64)] = n + np.arange(
                len(delta.deleted)
            )
            edges = snap[1]["edges"]
            el = now_pos[edges["left"].to_numpy(dtype=np.int64)]
            er = now_pos[edges["right"].to_numpy(dtype=np.int64)]
            live = (el < n) & (er < n)
            kept = live.copy()
            kept[live] = ~rematch[el[live]] & ~rematch[er[live]]
            auto = pairs[pairs["band"] == AUTO]
            new_l, new_r = auto["left"].to_numpy(), auto["right"].to_numpy()
            # Steward decisions: all active ones constrain the clusters they touch; those
            # taken or revoked since the last run re-decide their records' clusters.
            decided = review.active_decisions(engine)
            # The snapshot's run is the last that succeeded (read_snapshot checks it).
            last = store.last_run(engine)
            since = review.decisions_changed_since(engine, last[1] if last else None)
            keys_now = inc.record_keys(current) if len(decided) or len(since) else pd.Index([])
            must, cannot = inc.decision_links(decided, keys_now)
            moved = inc.decision_links(since.assign(kind="must_link"), keys_now)[0]
            reconsider = resurvive.copy()
            reconsider[moved["left"].to_numpy()] = True
            reconsider[moved["right"].to_numpy()] = True
            affected = inc.affected_records(
                n,
                len(delta.deleted),
                (el, er),
                (el[kept], er[kept]),
                (np.r_[new_l, must["left"].to_numpy()], np.r_[new_r, must["right"].to_numpy()]),
                rematch,
                reconsider,
            )
            summary.records_reclustered = int(affected.sum())
            links = inc.snapshot_edges(
                np.r_[el[kept], new_l],
                np.r_[er[kept], new_r],
                np.r_[edges["weight"].to_numpy()[kept], auto["weight"].to_numpy(np.float64)],
                np.r_[edges["probability"].to_numpy()[kept], auto["probability"].to_numpy()],
            )
            # Same orientation and order as a full run's edges (left < right, sorted).
            local = np.full(n, -1)
            local[affected] = np.arange(int(affected.sum()))
            inside = affected[links["left"].to_numpy()] & affected[links["right"].to_numpy()]
            graph = links[inside].assign(
                left=local[links["left"].to_numpy()[inside]],
                right=local[links["right"].to_numpy()[inside]],
            )
            must_here = must[affected[must["left"]] & affected[must["right"]]]
            cannot_here = cannot[affected[cannot["left"]] & affected[cannot["right"]]]
            cluster_ids, report = guarded_clusters(
                int(affected.sum()),
                graph.reset_index(drop=True),
                settings.matching.clustering,
                must_here.assign(left=local[must_here["left"]], right=local[must_here["right"]]),
                cannot_here.assign(
                    left=local[cannot_here["left"]], right=local[cannot_here["right"]]
                ),
            )
            summary.decisions_honoured = len(must) + len(cannot)
        summary.clusters = report.clusters
        summary.largest_cluster = report.largest
        summary.clusters_split = len(report.split_clusters)
        summary.weak_links_cut = report.bridges_cut

        keys = current.loc[affected, inc.KEYS]
        rows = np.flatnonzero(affected & ~is_changed)
        from_store = current.loc[rows, inc.KEYS]
        quarantined = pd.concat([m.quarantine for m in mapped] + npai_quarantine, ignore_index=True)
        quarantine_scope = sources + (["npai"] if settings.npai_returns else [])
        # The next snapshot (tonight's changed rows appended and every record's row, or
        # now and then a million rows taken and compressed, GIL-free in Arrow) is built
        # on a second thread. It reads only what no later step writes; tonight's line
        # and NPAI state are copied out of `current`, which this thread goes on using.
        snapshot_inputs = (
            snap[2]["records"],
            changed_rows,
            stored_pos,
            pd.DataFrame(
                {c: current[c].to_numpy(copy=True) for c in ("source_line", "npai_state")}
            ),
            rules,
            block_now,
        )

        def next_snapshot() -> store.SnapshotParts:
            records, keep_base = inc.next_snapshot(*snapshot_inputs)
            parts = store.serialise_snapshot({**records, "edges": links}, keep_base=keep_base)
            return store.keep_base_beside(engine, summary.run_id, parts)

        # What only finding the delta, the NPAI lookup and the clustering needed of
        # every stored record (a million keys as Python texts and their hash table, the
        # stored state, last night's links, tonight's loaded rows) is let go here: the
        # memory survivorship and the store's write then take comes back from it
        # instead of from new pages the kernel must zero (docs/benchmarks.md).
        deleted = delta.deleted
        # The stored hash of each snapshot record (Arrow texts): the records read back
        # from their payloads keep theirs.
        stored_hash = state["source_hash"]
        del loaded, state, delta, snap, edges, now_pos, el, er, live, kept

        # The transaction opens before survivorship, which reads the stored state of
        # the records in scope inside it. Survivorship itself runs on a worker thread,
        # beside the write of the match evidence's changes (`choose`).
        def choose(
            changed: pd.DataFrame, stored_payloads: pd.DataFrame
        ) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame, pd.DataFrame, np.ndarray]:
            """Tonight's affected records (the changed ones and the stored ones restored
            from their payloads), their clusters, their golden records, and the row in
            `current` of each of `stored_payloads`' records."""
            restored = inc.records_from_payload(stored_payloads, changed.dtypes)
            # Tonight's line and source hash, by position (no merge against all records).
            at_row = inc.record_keys(from_store).get_indexer(inc.record_keys(restored))
            if len(restored) != len(rows) or (at_row < 0).any():
                raise StoreError(
                    "the store's payloads do not match its snapshot: run `mdm run` "
                    "without --incremental to rebuild it"
                )
            at_current = rows[at_row]
            at_snapshot = current["snap_pos"].to_numpy()[at_current]
            restored = restored.assign(
                source_line=current["source_line"].to_numpy()[at_current],
                source_hash=stored_hash.take(at_snapshot).to_numpy(dtype=object),
            )
            restored = with_flags(restored, flags)
            # Changed records are all affected (they are matched again): with the
            # restored ones they are exactly the affected records.
            records = inc.run_order(inc.stack([changed, restored]), sources)
            # Positions follow `current` restricted to the affected records.
            labels = pd.Series(cluster_ids, index=records.index)
            return records, labels, *survive(records, labels, settings.survivorship), at_current

        at = now.replace(tzinfo=None)
        with (
            _return_files(settings.resolve(settings.export.dir), summary) as (staging, staged),
            ThreadPoolExecutor(1, thread_name_prefix="mdm-snapshot") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="mdm-survive") as survivor,
            store.transaction(engine) as conn,
        ):
            with self._stage("survive", summary, emit):
                # The stored state of every record in scope (tonight's affected ones and
                # the deleted ones), read once: payloads for the unchanged, the rest for
                # the write.
                scope = scope_read.result(
                    conn, pd.concat([keys, deleted[inc.KEYS]], ignore_index=True)
                )
                stored_payloads = scope.records.merge(from_store, on=inc.KEYS)
                chosen = survivor.submit(choose, changed, stored_payloads)
                del changed  # copied into the affected records
                # While a worker thread chooses the golden records, this one writes the
                # match evidence's changes: SQLite's work, done without the GIL, which
                # used to wait until survivorship was over (0.7-1.0 s at 1M records).
                # Collected before the first write: the run's transaction must not
                # wait on the child's read of the store.
                evidence = evidence_read.result(conn)
                returned = (
                    returns_read.result(conn, keep=night_returns.folder)
                    if returns_read is not None and night_returns is not None
                    else None
                )
                store.start_run(conn, summary.run_id, config_hash(settings), at)
                store.write_evidence_changes(conn, summary.run_id, evidence)
                # The records deleted at their source leave the store now: their keys
                # are known since the delta, and the connection would otherwise wait
                # for survivorship (0.2-0.3 s of SQL at 1M records, which the write's
                # first step took after it).
                removed = store.remove_records(
                    conn, summary.run_id, at, deleted[inc.KEYS].astype(str)
                )
                records, labels, golden, lineage, payload_rows = chosen.result()
            # The next snapshot is built on a second thread while the golden records and
            # source records are written, its GIL-free Arrow work beside the database's
            # (it is written last). Started with survivorship, its Python parts held the
            # GIL from the scope's answer and the choice of golden records, the night's
            # longest chain (0.9 s of work that is not needed before the end).
            snapshot_parts = pool.submit(next_snapshot)

            # The return files are handed to their child (else the survivor's thread,
            # idle now) as soon as the records' golden IDs are assigned, and written
            # while the store is.
            def make_returns(golden_ids: pd.Series) -> None:
                if night_returns is not None and returned is not None:
                    wanted = [c for c in (*inc.KEYS, *RETURN_COLUMNS) if c in records.columns]
                    tonight = records[wanted].assign(golden_id=golden_ids.to_numpy())
                    night_returns.start(returned, tonight, deleted, staging, survivor)

            with self._stage("store", summary, emit):
                written, _ = store.write_run(
                    conn,
                    summary.run_id,
                    at,
                    records,
                    list(inc.PAYLOAD_COLUMNS),
                    labels,
                    golden,
                    lineage,
                    quarantined,
                    quarantine_scope,
                    scope=scope,
                    removed=deleted[inc.KEYS].iloc[:0],  # removed above
                    # Read back and not re-flagged: their payload is the stored one. Taken
                    # by each payload's row in `current`, which `choose` found: merged on
                    # the keys, 80k records' keys were hashed again (0.1 s at 1M records).
                    as_stored=stored_payloads.take(
                        np.flatnonzero(~resurvive[payload_rows])
                    ).reset_index(drop=True),
                    steward=since,
                    assigned=make_returns,
                )
                written.records_removed = removed
                store.write_npai(conn, npai_before, npai_after)
                store.write_snapshot(conn, summary.run_id, snapshot_parts.result())
                summary.record_written(written)
            if night_returns is not None:
                with self._stage("export", summary, emit, total=len(mapped)):
                    staged.extend(night_returns.files())
                    # What the next night reads back of the full extracts' records.
                    store.write_held(conn, summary.run_id, night_returns.held_parts)
                    for m in mapped:
                        emit("export", "advance", {"source": m.source})
            summary.peak_rss_mib = round(self._memory.run_peak(), 1)
            store.finish_run(conn, summary.run_id, self._manifest(summary, mapped))
        self._report(summary, engine, records, pairs["weight"].to_numpy(), cluster_ids, quarantined)
        return summary

    def _report(
        self,
        summary: RunSummary,
        engine: Any,
        records: pd.DataFrame,
        weights: np.ndarray,
        labels: np.ndarray,
        quarantined: pd.DataFrame,
    ) -> None:
        """The run report (HTML and JSON), written once the store has committed: a
        report that cannot be written is a warning, the night's work stands."""
        folder = self.settings.resolve(self.settings.export.dir) / "reports"
        backlog = review.review_backlog(engine)
        data = report.build(
            summary, records, weights, labels, quarantined, backlog, report.latest(folder)
        )
        try:
            summary.report = str(report.write(data, folder))
        except OSError as exc:
            log.warning("run report not written to %s (%s)", folder, exc.__class__.__name__)

    def _load(
        self,
        summary: RunSummary,
        emit: EventCallback,
        run_date: pd.Timestamp,
        normalised: bool = False,
        zygote: Zygote | None = None,
    ) -> tuple[list[MappedSource], list[pd.DataFrame], list[pd.DataFrame]]:
        """Every source and NPAI return file, read and mapped (and its records normalised
        with `normalised`); rows read are accounted for. A load shared with a child
        forks it from `zygote` if given."""
        settings = self.settings
        returns: list[pd.DataFrame] = []
        npai_quarantine: list[pd.DataFrame] = []
        with self._stage("load", summary, emit, total=len(settings.sources)):

            def loaded(m: MappedSource) -> None:
                if m.rows_read != len(m.records) + len(m.quarantine) + len(m.deleted):
                    raise DataContractError(
                        f"source '{m.source}': {m.rows_read} rows read but "
                        f"{len(m.records)} records + {len(m.quarantine)} quarantined "
                        f"+ {len(m.deleted)} deletions"
                    )
                emit("load", "advance", {"source": m.source})

            mapped = load_sources(settings, run_date, loaded, normalised=normalised, zygote=zygote)
            summary.sources.extend(
                SourceCounts(m.source, m.rows_read, len(m.records), len(m.quarantine), m.duplicates)
                for m in mapped
            )
            for return_file in settings.npai_returns:
                got, bad = read_returns(return_file, settings)
                returns.append(got)
                npai_quarantine.append(bad)
        return mapped, returns, npai_quarantine

    def _npai_flags(
        self,
        current: pd.DataFrame,
        returns: list[pd.DataFrame],
        before: pd.DataFrame,
        sent: pd.DataFrame,
        summary: RunSummary,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(current flag per record, NPAI state after the run) for (source, source_key,
        address_hash) of every record the sources deliver tonight."""
        got = (
            pd.concat(returns, ignore_index=True)
            if returns
            else pd.DataFrame(columns=["source", "source_key", "return_date", "reason_text"])
        )
        got["reason_code"] = npai.reason_code(got["reason_text"])
        got["reason_label"] = got["reason_code"].map(npai.REASONS)
        state = before if len(before) else npai.empty_state()
        after = npai.update_flags(state, got, current, sent, summary.run_id)
        summary.npai_returns_read = len(got)
        summary.npai_flags_new = int((after["flagged_run"] == summary.run_id).sum())
        summary.npai_flags_cleared = int((after["cleared_run"] == summary.run_id).sum())
        flags = npai.current_flags(after)
        summary.npai_flags_active = len(flags)
        return flags, after

    def _npai(
        self,
        engine: Any,
        records: pd.DataFrame,
        returns: list[pd.DataFrame],
        before: pd.DataFrame,
        summary: RunSummary,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Apply La Poste returns, and clear flags whose address changed since."""
        # The address as sent matters only to the records with a flag or a return.
        sent = store.read_sent(
            engine, pd.concat([before[inc.KEYS], *(r[inc.KEYS] for r in returns)])
        )
        hashes = npai.address_hash(records)
        current = pd.DataFrame(
            {
                "source": records["source"],
                "source_key": records["source_key"],
                "address_hash": hashes,
            }
        )
        flags, after = self._npai_flags(current, returns, before, sent, summary)
        return with_flags(records, flags, address_hash=hashes), after

    @staticmethod
    def _payload_job(
        records: pd.DataFrame, columns: list[str], done: ExitStack
    ) -> payloads.PayloadJob | None:
        """The records' payloads started in a child process (`payloads`), for a run
        large enough that the child's start-up is worth it; closed by `done`."""
        if len(records) < payloads.MIN_RECORDS:
            return None
        job = payloads.PayloadJob(
            records, columns, store.write_order(records), store.WRITE_CHUNK_ROWS
        )
        done.callback(job.close)
        return job

    def _export_job(
        self,
        mapped: list[MappedSource],
        sizes: list[int],
        records: pd.DataFrame,
        out_dir: Path,
        done: ExitStack,
    ) -> exporting.ExportJob | None:
        """The return files handed to a child process (`exporting`), for a run large
        enough that the child's start-up is worth it; closed by `done`."""
        if not self.settings.export.enabled or len(records) < exporting.MIN_RECORDS:
            return None
        try:
            job = exporting.ExportJob(
                [self.settings.source(m.source) for m in mapped],
                [m.raw for m in mapped],
                _return_parts(records, sizes),
                out_dir,
                held=self.settings.export.incremental,
            )
        except OSError as exc:  # no room for its inputs: the files are written here
            log.warning("return files could not be handed to a child (%s)", type(exc).__name__)
            return None
        done.callback(job.close)
        return job

    def _export(
        self,
        mapped: list[MappedSource],
        sizes: list[int],
        records: pd.DataFrame,
        golden_ids: pd.Series,
        out_dir: Path,
        emit: EventCallback,
    ) -> tuple[list[Path], bytes | None]:
        """Each source's file written back (its records are `sizes[i]` rows of
        `records`, in the sources' order), and the held part of the sources sent as
        full extracts, as an export job makes them (`exporting.HeldPart`)."""
        specs = [self.settings.source(m.source) for m in mapped]
        whole = exporting.held_sources(specs) if self.settings.export.incremental else []
        sink = io.BytesIO()
        held = exporting.HeldPart(sink, whole) if whole else None
        paths = []
        offset = 0
        for spec, m, part in zip(specs, mapped, _return_parts(records, sizes), strict=True):
            part = part.assign(golden_id=golden_ids.iloc[offset : offset + len(part)].to_numpy())
            offset += len(part)
            if held is not None:
                held.add(spec.name, part)
            paths.append(write_back(spec, m.raw, return_columns(part), out_dir))
            emit("export", "advance", {"source": m.source})
        if held is None:
            return paths, None
        held.close()
        return paths, sink.getvalue()

    def _manifest(self, summary: RunSummary, mapped: list[MappedSource]) -> dict[str, Any]:
        return {
            "run_id": summary.run_id,
            "version": __version__,
            "config_hash": config_hash(self.settings),
            "inputs": {m.source: m.fingerprint for m in mapped},
            "summary": asdict(summary),
            "model": self._model,
        }


def with_flags(records: pd.DataFrame, flags: pd.DataFrame, **more: pd.Series) -> pd.DataFrame:
    """Records with their current NPAI flag, date and reason (replacing any they had),
    and the columns `more` (aligned with them), in their order, positionally indexed.

    Each record's flag is found by key and the three columns are added to the
    records' own: a merge would copy every column of every record (the ~80 of a
    million records in a full run) to add three. The new frame shares the other
    columns' data with `records`, which callers replace by it.
    """
    at = inc.record_keys(flags).get_indexer(inc.record_keys(records))
    found = at >= 0
    data: dict[str, Any] = {
        c: column.to_numpy() if isinstance(column.dtype, np.dtype) else column.array
        for c, column in {**dict(records.items()), **more}.items()
        if c not in store.NPAI_STATE_COLUMNS
    }
    flag = np.zeros(len(records), dtype=bool)
    flag[found] = flags["npai_flag"].astype("boolean").fillna(False).to_numpy(bool)[at[found]]
    data["npai_flag"] = flag
    for c in store.NPAI_STATE_COLUMNS[1:]:
        values = np.full(len(records), np.nan, dtype=object)
        values[found] = flags[c].to_numpy(dtype=object)[at[found]]
        data[c] = values
    return pd.DataFrame(data, copy=False)


def _evidence(records: pd.DataFrame, result: MatchResult) -> pd.DataFrame:
    """Auto-match and review pairs by source key, with each comparison's contribution.

    Only these are kept: they are what a steward reviews and what an auditor asks
    about ("why were these two merged?"); non-matches would be most of the rows.
    """
    pairs = result.pairs[result.pairs["band"].isin([AUTO, REVIEW])].reset_index(drop=True)
    contrib_cols = [c for c in pairs.columns if c.startswith("w_")]
    # Rounded as doubles: a float32 rounded to 6.513 is written 6.5130000114, digits
    # the model never had (205 bytes of contributions a pair instead of 171 at 1M).
    contrib = pairs[contrib_cols].astype(np.float64).round(3).rename(columns=lambda c: c[2:])
    # One JSON line a pair, pandas' own text (`jsonrows`) built in Arrow and kept there
    # (as are the keys below): a million pairs' texts as Python strings, and the
    # whole text pandas writes before it is split, are a few hundred megabytes.
    contributions = json_rows(contrib)

    # Keys as text at the pairs' records only (an incremental run holds a million).
    def ends(column: str, side: str) -> pa.Array:
        taken = records[column].take(pairs[side].to_numpy())
        return pa.array(taken.astype(schema.text_dtype()).array).cast(pa.large_string())

    source_l, source_r = ends("source", "left"), ends("source", "right")
    key_l, key_r = ends("source_key", "left"), ends("source_key", "right")
    # A pair is stored one way round whatever the load order: the smaller (source, key)
    # on the left, so that an incremental run finds the row a full run wrote. UTF-8
    # bytes sort as the code points Python compares.
    swap = pc.or_(
        pc.greater(source_l, source_r),
        pc.and_(pc.equal(source_l, source_r), pc.greater(key_l, key_r)),
    )
    text_of = schema.text_dtype()
    return pd.DataFrame(
        {
            "left_source": pd.array(pc.if_else(swap, source_r, source_l), dtype=text_of),
            "left_key": pd.array(pc.if_else(swap, key_r, key_l), dtype=text_of),
            "right_source": pd.array(pc.if_else(swap, source_l, source_r), dtype=text_of),
            "right_key": pd.array(pc.if_else(swap, key_l, key_r), dtype=text_of),
            "rule": pairs["rule"].astype(str).to_numpy(),
            "weight": pairs["weight"].to_numpy(dtype=float),
            "probability": pairs["probability"].to_numpy(dtype=float),
            "band": pairs["band"].astype(str).to_numpy(),
            "contributions": pd.array(contributions, dtype=text_of),
        }
    )


def _snapshot(
    records: pd.DataFrame,
    auto: pd.DataFrame,
    block_keys: list[np.ndarray],
    rules: list[BlockingRule],
) -> dict[str, pd.DataFrame | pa.Table]:
    """What an incremental run reads of this run: every record's matching view, hashes
    and block keys, and the auto-match links between them (positions in `records`)."""
    # The columns it needs, side by side without a copy of the records (a million
    # records' columns are half a gigabyte of arrays).
    made = {
        "source_key": records["source_key"].astype(str),
        "npai_state": store.npai_state_text(records),
    }
    frame = pd.DataFrame(
        {c: made[c] if c in made else records[c] for c in inc.SNAPSHOT_COLUMNS}, copy=False
    )
    edges = inc.snapshot_edges(
        auto["left"].to_numpy(),
        auto["right"].to_numpy(),
        auto["weight"].to_numpy(dtype=np.float64),
        auto["probability"].to_numpy(),
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return {"records": inc.with_block_keys(table, rules, block_keys), "edges": edges}


@contextmanager
def _return_files(export_dir: Path, summary: RunSummary) -> Iterator[tuple[Path, list[Path]]]:
    """A staging folder for a run's return files, and the list of those written into it.

    They replace the previous files only if the block (which holds the run's
    transaction) ends without error, i.e. once the run has committed; the folder
    goes either way. A business unit never gets files from a run the store does not
    hold."""
    staging = Path(tempfile.mkdtemp(prefix=".mdm-export-", dir=_existing_parent(export_dir)))
    staged: list[Path] = []
    try:
        yield staging, staged
        for path in staged:
            export_dir.mkdir(parents=True, exist_ok=True)
            final = export_dir / path.name
            path.replace(final)
            summary.exports.append(str(final))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder, so staging files live on the same filesystem."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path(tempfile.gettempdir())
