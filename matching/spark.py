"""The matching stage on Apache Spark: the same pairs, scores and bands as `engine.match`.

What runs where, and why:

- the driver (the `mdm run` process) already holds the normalised records: it
  folds each blocking rule's key into a block number with the local code
  (`blocking.block_ids`, a few vectorised passes), so that blocks are exactly
  the local engine's, and writes two Parquet files to the work folder: the
  records' matching view, and one row (record, rule, block) per block a record
  is in;
- Spark partitions those rows by (rule, block), so that each block is whole in
  one partition, and forms its pairs there with `blocking.pairs_within`; a pair
  found by several rules keeps the first, as locally;
- the pairs are joined with both records' fields and compared in Arrow batches
  (`mapInPandas`) by the local comparison and evidence code, one call per batch
  of `spark.batch_pairs` pairs, never one per pair or per small block;
- the executors write the scored pairs to the work folder; the driver reads them
  back, fits the prior over all of them and bands them (`engine.scored`): the
  store needs every pair's evidence anyway, and clustering with the chaining
  guard runs on the driver.

PySpark is an extra (`pip install "mdm-pipeline[spark]"`) and needs Java 17 or
later: nothing here is imported unless `engine: spark` is chosen.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mdm_pipeline.config.errors import ConfigError
from mdm_pipeline.config.settings import MatchingSettings, SparkSettings
from mdm_pipeline.matching.blocking import (
    PAIR_DTYPE,
    Candidates,
    RuleStats,
    block_ids,
    block_stats,
    pairs_within,
    warn_skipped,
)
from mdm_pipeline.matching.comparisons import compare, term_frequencies
from mdm_pipeline.matching.engine import MatchResult, scored
from mdm_pipeline.matching.keys import FIELD_COLUMNS, Fields, prepare
from mdm_pipeline.matching.scoring import Evidence, Model, evidence

#: The columns `keys.prepare` reads: what the executors need of each record.
VIEW_COLUMNS = ["record_type", *dict.fromkeys(FIELD_COLUMNS.values())]

INSTALL_HINT = (
    'engine "spark" needs PySpark and Java 17 or later: pip install "mdm-pipeline[spark]"'
)


def check_installed() -> None:
    """Fail with what to install when PySpark is missing."""
    try:
        import pyspark.sql  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def session(cfg: SparkSettings) -> Any:
    """The Spark session of this process, started with `cfg` if there is none."""
    check_installed()
    from pyspark.sql import SparkSession

    # Workers run this interpreter (with this project installed), not the first
    # `python3` on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(cfg.master)
        .appName(cfg.app_name)
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.batch_pairs))
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # Java missing or refused: PySpark raises its own types
        raise ConfigError(
            f'engine "spark": Spark could not start ({exc.__class__.__name__}); '
            "it needs Java 17 or later on PATH or in JAVA_HOME"
        ) from None
    # Errors only: Spark's warnings could quote rows of customer data.
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _view(records: pd.DataFrame) -> pd.DataFrame:
    """The matching view as Parquet can carry it: birth dates as ISO text (a timestamp
    would cross Spark's session time zone), every other field as text."""
    view = pd.DataFrame({"id": np.arange(len(records), dtype=np.int64)})
    for col in VIEW_COLUMNS:
        values = records[col]
        if col == "birth_date":
            dates = pd.to_datetime(values, errors="coerce")
            view[col] = dates.dt.strftime("%Y-%m-%d").where(dates.notna(), None)
        else:
            view[col] = values.astype(object).where(values.notna(), None)
    return view


def _from_view(view: pd.DataFrame) -> pd.DataFrame:
    """Records as `keys.prepare` expects them, from the view's columns."""
    out = view.copy()
    out["birth_date"] = pd.to_datetime(out["birth_date"], format="%Y-%m-%d", errors="coerce")
    return out


def _pairs_in_blocks(max_block_size: int) -> Any:
    """The function each partition of (id, rule, block) runs: every block is whole in
    its partition, so the local pair layout gives the local pairs."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        frames = list(batches)
        if not frames:
            return
        rows = pd.concat(frames, ignore_index=True)
        for rule, part in rows.groupby("rule", sort=True):
            ids = part["id"].to_numpy(dtype=np.int64)
            codes, _ = pd.factorize(part["block"].to_numpy())
            left, right, _, _ = pairs_within(codes, max_block_size)
            a, b = ids[left], ids[right]
            yield pd.DataFrame(
                {
                    "left": np.minimum(a, b),
                    "right": np.maximum(a, b),
                    "rule": np.full(len(a), rule, dtype=np.int16),
                }
            )

    return run


def _score_batches(settings: MatchingSettings, model: Model, tf: dict[str, pd.Series]) -> Any:
    """The function each batch of joined pairs runs: the local comparison and evidence
    code over the batch's records (left ones, then right ones)."""
    comps = settings.comparisons

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            n = len(batch)
            if not n:
                continue
            left = batch[[f"l_{c}" for c in VIEW_COLUMNS]].set_axis(VIEW_COLUMNS, axis=1)
            right = batch[[f"r_{c}" for c in VIEW_COLUMNS]].set_axis(VIEW_COLUMNS, axis=1)
            fields = prepare(_from_view(pd.concat([left, right], ignore_index=True)))
            vectors = compare(fields, np.arange(n), n + np.arange(n), comps, tf)
            ev = evidence(vectors, model, comps)
            out = pd.DataFrame(
                {
                    "left": batch["left"].to_numpy(),
                    "right": batch["right"].to_numpy(),
                    "rule": batch["rule"].to_numpy(),
                    "ratio": ev.ratio,
                    "context_odds": ev.context_odds,
                    "context_code": ev.context_code.astype(np.int16),
                }
            )
            for col in ev.contributions.columns:
                out[f"c_{col}"] = ev.contributions[col].to_numpy(dtype=np.float32)
            yield out

    return run


def _contribution_columns(
    fields: Fields, settings: MatchingSettings, model: Model, tf: dict[str, pd.Series]
) -> tuple[list[str], tuple[str, ...]]:
    """The evidence's contribution columns and context names, from the local code on
    an empty set of pairs: the executors' output has exactly these."""
    empty = np.array([], dtype=PAIR_DTYPE)
    ev = evidence(
        compare(fields, empty, empty, settings.comparisons, tf), model, settings.comparisons
    )
    return list(ev.contributions.columns), ev.context_names


def match_spark(
    records: pd.DataFrame,
    settings: MatchingSettings,
    model: Model,
    cfg: SparkSettings,
    fields: Fields | None = None,
) -> MatchResult:
    """Score every candidate pair on Spark: the same result as `engine.match`."""
    spark = session(cfg)
    from pyspark.sql import functions as F

    fields = fields if fields is not None else prepare(records)
    rules = settings.blocking.rules
    cap = settings.blocking.max_block_size
    tf = model.term_freq or term_frequencies(fields, settings.comparisons)
    columns, context_names = _contribution_columns(fields, settings, model, tf)
    partitions = cfg.partitions or 4 * spark.sparkContext.defaultParallelism
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))

    own_dir = cfg.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="mdm-spark-")) if own_dir else None
    base = str(work) if work is not None else str(cfg.work_dir).rstrip("/")
    try:
        stats: dict[str, RuleStats] = {}
        memberships = []
        for code, rule in enumerate(rules):
            ids = block_ids(fields, rule)
            member = np.flatnonzero(ids >= 0)
            memberships.append(
                pa.table(
                    {
                        "id": pa.array(member, pa.int64()),
                        "rule": pa.array(np.full(len(member), code, dtype=np.int16)),
                        "block": pa.array(ids[member], pa.int64()),
                    }
                )
            )
            pairs, skipped, skipped_records, largest = block_stats(ids, cap)
            stats[rule.name] = RuleStats(pairs, 0, skipped, skipped_records, largest)
            warn_skipped(rule, cap, skipped, skipped_records)
        _write(pa.concat_tables(memberships), f"{base}/blocks.parquet", own_dir)
        _write(
            pa.Table.from_pandas(_view(records), preserve_index=False),
            f"{base}/view.parquet",
            own_dir,
        )

        blocks = spark.read.parquet(f"{base}/blocks.parquet")
        view = spark.read.parquet(f"{base}/view.parquet")
        found = (
            blocks.repartition(partitions, "rule", "block")
            .mapInPandas(_pairs_in_blocks(cap), "left long, right long, rule short")
            .groupBy("left", "right")
            .agg(F.min("rule").alias("rule"))
        )
        lview = view.select([F.col(c).alias(f"l_{c}") for c in ["id", *VIEW_COLUMNS]])
        rview = view.select([F.col(c).alias(f"r_{c}") for c in ["id", *VIEW_COLUMNS]])
        joined = found.join(lview, found["left"] == lview["l_id"]).join(
            rview, found["right"] == rview["r_id"]
        )
        schema = ", ".join(
            [
                "left long",
                "right long",
                "rule short",
                "ratio double",
                "context_odds double",
                "context_code short",
                *[f"`c_{c}` float" for c in columns],
            ]
        )
        scored_pairs = joined.mapInPandas(_score_batches(settings, model, tf), schema)
        scored_pairs.write.mode("overwrite").parquet(f"{base}/pairs.parquet")
        table = _read(f"{base}/pairs.parquet", own_dir)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    # In the local engine's order: by left record, then right.
    order = np.lexsort((table["right"].to_numpy(), table["left"].to_numpy()))
    left = table["left"].to_numpy()[order].astype(PAIR_DTYPE)
    right = table["right"].to_numpy()[order].astype(PAIR_DTYPE)
    codes = table["rule"].to_numpy()[order].astype(np.int16)
    new_counts = np.bincount(codes, minlength=len(rules))
    for code, rule in enumerate(rules):
        stats[rule.name] = RuleStats(
            stats[rule.name].pairs,
            int(new_counts[code]),
            stats[rule.name].skipped_blocks,
            stats[rule.name].skipped_records,
            stats[rule.name].largest_block,
        )
    cands = Candidates(
        left, right, pd.Categorical.from_codes(codes, categories=[r.name for r in rules]), stats
    )
    ev = Evidence(
        table["ratio"].to_numpy()[order],
        table["context_odds"].to_numpy()[order],
        table["context_code"].to_numpy()[order].astype(np.int8),
        context_names,
        pd.DataFrame({c: table[f"c_{c}"].to_numpy()[order].astype(np.float32) for c in columns}),
    )
    return scored(fields.type_codes, cands, ev, settings, model)


def _write(table: pa.Table, path: str, local: bool) -> None:
    """A Parquet file the executors read: written by the driver, locally or through
    Arrow's file systems (HDFS, S3) when the work folder is a URI."""
    if local:
        pq.write_table(table, path)
        return
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(path)
    pq.write_table(table, where, filesystem=filesystem)


def _read(path: str, local: bool) -> pd.DataFrame:
    """The scored pairs written by the executors, as columns."""
    if local:
        return pq.read_table(path).to_pandas()
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(path)
    return pq.read_table(where, filesystem=filesystem).to_pandas()
