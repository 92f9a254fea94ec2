"""The `mdm` command: parses arguments, draws progress, maps errors to exit codes.

Exit codes: 0 success; 1 the run failed on its data (unreadable source, store
refused, internal error); 2 usage or configuration error. Every failure is
one line on stderr; tracebacks only with --debug. Messages never carry a
customer's personal data: internal errors are reported by type and place.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from mdm_pipeline.config.errors import ConfigError, MdmError

app = typer.Typer(
    help="mdm-pipeline: nightly customer master-data consolidation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console(soft_wrap=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The deployment's YAML configuration.")
]


def _error_line(message: str) -> None:
    """One unwrapped line on stderr (rich would wrap long paths)."""
    typer.echo(f"error: {message}", err=True)


def _fail(exc: BaseException, debug: bool) -> typer.Exit:
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, ConfigError):
        for line in exc.messages:
            _error_line(line)
        return typer.Exit(code=2)
    if isinstance(exc, MdmError):
        _error_line(str(exc))
        return typer.Exit(code=exc.exit_code)
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    _error_line(
        f"internal error ({type(exc).__name__}{where}); rerun with --debug for the traceback"
    )
    return typer.Exit(code=1)


class Engine(StrEnum):
    """Where the matching stage runs (`engine` in the config)."""

    local = "local"
    spark = "spark"


class _StageProgress:
    """Draws one progress bar per stage from the pipeline's events."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, event: str, info: dict[str, Any]) -> None:
        if event == "start":
            self.tasks[stage] = self.progress.add_task(stage, total=info.get("total") or 1)
        elif event == "advance":
            self.progress.advance(self.tasks[stage])
        elif event == "end":
            task = self.tasks[stage]
            self.progress.update(task, completed=self.progress.tasks[task].total)


def _summary_table(summary: Any) -> Table:
    table = Table(title=f"run {summary.run_id}", show_lines=False)
    for col in ("source", "rows read", "records", "quarantined", "duplicate keys"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for s in summary.sources:
        table.add_row(
            s.name, f"{s.rows_read:,}", f"{s.records:,}", f"{s.quarantined:,}", f"{s.duplicates:,}"
        )
    total = [
        sum(getattr(s, k) for s in summary.sources)
        for k in ("rows_read", "records", "quarantined", "duplicates")
    ]
    table.add_row("total", *(f"{v:,}" for v in total), style="bold")
    return table


def _figures_table(summary: Any) -> Table:
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        (
            "run mode",
            "full"
            if summary.mode == "full"
            else f"incremental: {summary.records_changed:,} changed, "
            f"{summary.records_deleted:,} deleted, {summary.records_reclustered:,} re-clustered",
        ),
        ("matching model", f"{summary.model_status} (run {summary.model_run})"),
        ("candidate pairs", f"{summary.candidate_pairs:,}"),
        *((f"  rule {k}", f"{v:,}") for k, v in summary.pairs_per_rule.items()),
        ("auto-matched pairs", f"{summary.matched_edges:,}"),
        ("pairs for review", f"{summary.review_pairs:,}"),
        ("clusters", f"{summary.clusters:,}"),
        ("largest cluster", f"{summary.largest_cluster:,}"),
        ("clusters split by the chaining guard", f"{summary.clusters_split:,}"),
        ("golden records created", f"{summary.golden_created:,}"),
        ("golden records updated", f"{summary.golden_updated:,}"),
        ("golden records unchanged", f"{summary.golden_unchanged:,}"),
        ("golden records retired", f"{summary.golden_retired:,}"),
        ("merges / splits", f"{summary.merges:,} / {summary.splits:,}"),
        ("NPAI returns read", f"{summary.npai_returns_read:,}"),
        (
            "NPAI flags new / cleared",
            f"{summary.npai_flags_new:,} / {summary.npai_flags_cleared:,}",
        ),
        ("NPAI flags active", f"{summary.npai_flags_active:,}"),
        *((f"time {k}", f"{v:.2f} s") for k, v in summary.seconds.items()),
        ("time total", f"{sum(summary.seconds.values()):.2f} s"),
        ("peak memory", f"{summary.peak_rss_mib:,.0f} MiB"),
        ("store", summary.store),
    ]
    for what, value in rows:
        table.add_row(what, value)
    return table


@app.command()
def run(
    config: ConfigOption,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    retrain: Annotated[
        bool,
        typer.Option(
            "--retrain", help="Train a new matching model instead of reusing the stored one."
        ),
    ] = False,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental",
            help="Normalise and match only the records that changed since the last run.",
        ),
    ] = False,
    engine: Annotated[
        Engine | None,
        typer.Option(
            "--engine",
            help="Where matching runs, overriding the config's `engine` "
            "(spark needs the package's spark extra: PySpark, and Java 17).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Run the nightly job: load, normalise, match, cluster, store golden records, export."""
    from mdm_pipeline.pipeline.allocator import keep_freed_memory, no_blas_threads

    no_blas_threads()  # before numpy is imported (with the pipeline, below)
    from mdm_pipeline.golden_records.zygote import Zygote
    from mdm_pipeline.pipeline.run import Pipeline

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    keep_freed_memory()  # this process is the night's: its freed memory is for itself
    # Before the progress display's thread: a copy of this process, its modules
    # imported, that forks the night's readers of the store (`zygote`).
    zygote = Zygote.start() if incremental else None
    try:
        pipeline = Pipeline.from_config(config)
        if engine is not None:
            pipeline.settings = pipeline.settings.model_copy(update={"engine": engine.value})
        with Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=json_output,
            disable=json_output,
        ) as progress:
            summary = pipeline.run(
                on_event=_StageProgress(progress),
                retrain=retrain,
                incremental=incremental,
                zygote=zygote,
            )
    except Exception as exc:
        raise _fail(exc, debug) from None
    finally:
        if zygote is not None:
            zygote.close()
    if json_output:
        out.print_json(json.dumps(asdict(summary)))
        return
    out.print(_summary_table(summary))
    out.print(_figures_table(summary))
    for path in summary.exports:
        out.print(f"return file: {path}", highlight=False)
    if summary.report:
        out.print(f"run report: {summary.report}", highlight=False)


TruthOption = Annotated[
    Path | None,
    typer.Option("--truth", help="CSV of source, source_key, entity_id (known duplicates)."),
]


@app.command("block-stats")
def block_stats(
    config: ConfigOption,
    truth: TruthOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Candidate pairs per blocking rule and, given a truth file, the true pairs kept."""
    from mdm_pipeline.pipeline.run import Pipeline

    try:
        stats = Pipeline.from_config(config).block_stats(truth)
    except Exception as exc:
        raise _fail(exc, debug) from None
    if json_output:
        out.print_json(json.dumps(asdict(stats)))
        return
    table = Table(title=f"blocking on {stats.records:,} records")
    cols = ["rule", "pairs", "new pairs", "largest block", "blocks skipped", "records skipped"]
    if truth is not None:
        cols.append("new true pairs")
    for col in cols:
        if col == "rule":
            table.add_column(col, no_wrap=True, min_width=max(map(len, stats.rules), default=4))
        else:
            table.add_column(col, justify="right")
    for name, r in stats.rules.items():
        row = [name, r["pairs"], r["new_pairs"], r["largest_block"], r["skipped_blocks"]]
        row.append(r["skipped_records"])
        if truth is not None:
            row.append(r.get("true_pairs_new", 0))
        table.add_row(*(str(v) if isinstance(v, str) else f"{v:,}" for v in row))
    out.print(table)
    out.print(f"candidate pairs: {stats.candidate_pairs:,}", highlight=False)
    if stats.true_pairs is not None:
        share = stats.true_pairs_kept / stats.true_pairs if stats.true_pairs else 1.0
        out.print(
            f"true pairs kept: {stats.true_pairs_kept:,} of {stats.true_pairs:,} ({share:.2%})",
            highlight=False,
        )


@app.command()
def evaluate(
    config: ConfigOption,
    truth: Annotated[Path, typer.Option("--truth", help="CSV of source, source_key, entity_id.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Pairwise and B-cubed precision, recall and F1 of the stored clusters."""
    from mdm_pipeline.pipeline.run import Pipeline

    try:
        result = Pipeline.from_config(config).evaluate(truth)
    except Exception as exc:
        raise _fail(exc, debug) from None
    if json_output:
        out.print_json(json.dumps(asdict(result)))
        return
    table = Table(title=f"clusters in the store against {truth.name}")
    table.add_column("measure")
    for col in ("precision", "recall", "F1"):
        table.add_column(col, justify="right")
    table.add_row(
        "pairwise",
        f"{result.pair_precision:.4f}",
        f"{result.pair_recall:.4f}",
        f"{result.pair_f1:.4f}",
    )
    table.add_row(
        "B-cubed",
        f"{result.bcubed_precision:.4f}",
        f"{result.bcubed_recall:.4f}",
        f"{result.bcubed_f1:.4f}",
    )
    out.print(table)
    out.print(
        f"records evaluated: {result.records_evaluated:,} of {result.records_in_store:,} "
        f"in the store; largest cluster {result.largest_cluster} "
        f"(largest true cluster {result.largest_true_cluster})",
        highlight=False,
    )


@app.command("validate-config")
def validate_config(
    config: Annotated[Path, typer.Argument(help="The YAML configuration to check.")],
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Check the configuration and that every mapped column exists in its source."""
    from mdm_pipeline.pipeline.run import Pipeline

    try:
        pipeline = Pipeline.from_config(config)
        pipeline.check_sources()
    except Exception as exc:
        raise _fail(exc, debug) from None
    n = len(pipeline.settings.sources)
    out.print(f"{config}: OK ({n} sources, every mapped column found)", highlight=False)


@app.command()
def unlock(
    config: ConfigOption,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Release the store's run lock left by a run that died on another machine."""
    from mdm_pipeline.config.loader import store_url
    from mdm_pipeline.golden_records import store
    from mdm_pipeline.pipeline.run import Pipeline

    try:
        engine = store.connect(store_url(Pipeline.from_config(config).settings))
        held = store.unlock(engine)
        engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None
    out.print(f"lock of run {held} released" if held else "the store was not locked")


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the extracts to.")],
    records: Annotated[int, typer.Option(min=20, help="Number of records across the BUs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 20261122,
) -> None:
    """Write synthetic extracts of four business units, with truth and a config."""
    from mdm_pipeline.sources.synthetic import generate as make

    made = make(out_dir, records, seed)
    total = sum(made.records.values())
    out.print(
        f"wrote {total:,} records of {made.entities:,} customers to {out_dir}", highlight=False
    )


@app.command()
def rnvp(
    in_path: Annotated[Path, typer.Option("--in", help="CSV file to clean.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the cleaned CSV.")],
    address: Annotated[
        str, typer.Option(help="Address line columns, comma-separated, in any order.")
    ],
    postcode: Annotated[str | None, typer.Option(help="Postcode column.")] = None,
    city: Annotated[str | None, typer.Option(help="Town column.")] = None,
    country: Annotated[str | None, typer.Option(help="Country column.")] = None,
    name: Annotated[str | None, typer.Option(help="Recipient column (line 1).")] = None,
    encoding: Annotated[str, typer.Option(help="utf-8, utf-8-sig, cp1252, latin-1.")] = "utf-8",
    delimiter: Annotated[str, typer.Option(help="Field separator.")] = ",",
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Clean a stand-alone CSV of addresses into the NF Z10-011 form (no config needed)."""
    from pydantic import ValidationError

    from mdm_pipeline.pipeline.standalone import clean_addresses_file

    try:
        summary = clean_addresses_file(
            in_path,
            out_path,
            [c.strip() for c in address.split(",") if c.strip()],
            postcode,
            city,
            country,
            name,
            encoding,
            delimiter,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        _error_line(f"--{first['loc'][0]}: {first['msg']}")
        raise typer.Exit(code=2) from None
    except Exception as exc:
        raise _fail(exc, debug) from None
    if json_output:
        out.print_json(json.dumps(asdict(summary)))
        return
    table = Table(title=f"{in_path.name} -> {out_path.name}")
    table.add_column("what")
    table.add_column("rows", justify="right")
    table.add_row("read", f"{summary.rows_read:,}")
    table.add_row("written", f"{summary.rows_written:,}")
    table.add_row("quarantined (unreadable)", f"{summary.quarantined:,}")
    for status, n in sorted(summary.status.items()):
        table.add_row(f"status {status}", f"{n:,}")
    table.add_row("NPAI risk", f"{summary.npai_risk:,}")
    for code, n in sorted(summary.codes.items(), key=lambda kv: -kv[1]):
        table.add_row(f"  {code}", f"{n:,}")
    out.print(table)
    if summary.quarantine_file:
        out.print(f"unreadable rows: {summary.quarantine_file}", highlight=False)


# --- the steward's review workflow -------------------------------------------------------

review_app = typer.Typer(
    help="Review uncertain pairs and record decisions that every later run honours.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")

AuthorOption = Annotated[str, typer.Option("--author", help="Who decides (kept with it).")]
CommentOption = Annotated[
    str | None, typer.Option("--comment", help="Why, in the steward's words.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DebugOption = Annotated[bool, typer.Option(help="Show tracebacks.")]

#: Fields shown side by side: (label, raw column, normalised column, comparison name).
SHOWN_FIELDS = (
    ("civility", "civility", "civility_norm", None),
    ("first name", "first_name", "first_name_norm", "first_name"),
    ("last name", "last_name", "last_name_norm", "last_name"),
    ("birth name", "birth_name", "birth_name_norm", "birth_name"),
    ("birth date", "birth_date", "birth_date", "birth_date"),
    ("e-mail", "email", "email_norm", "email"),
    ("phone", "phone", "phone_norm", "phone"),
    ("street", "street", "street_norm", "street"),
    ("postcode", "postcode", "postcode_norm", "postcode"),
    ("city", "city", "city_norm", "city"),
    ("company", "company_name", "company_name_norm", "company_name"),
    ("SIREN", "siren", "siren_norm", "siren"),
    ("customer ref", "customer_ref", "customer_ref_norm", "customer_ref"),
)


def _engine(config: Path) -> Any:
    from mdm_pipeline.config.loader import load_settings, store_url
    from mdm_pipeline.golden_records.connection import connect

    return connect(store_url(load_settings(config)))


def _frame_json(frame: Any) -> None:
    out.print_json(frame.to_json(orient="records", date_format="iso"))


@review_app.command("list")
def review_list(
    config: ConfigOption,
    source: Annotated[str | None, typer.Option(help="Only items with a record of it.")] = None,
    min_score: Annotated[float | None, typer.Option(help="Lowest match probability.")] = None,
    max_score: Annotated[float | None, typer.Option(help="Highest match probability.")] = None,
    min_size: Annotated[
        int | None, typer.Option(help="Fewest records the item's golden records hold.")
    ] = None,
    kind: Annotated[
        str, typer.Option(help="pair (review band), cluster (split by the guard) or all.")
    ] = "all",
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 50,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Pairs in the review band and clusters the chaining guard split, without a
    decision, most uncertain first."""
    from mdm_pipeline.golden_records import review

    if kind not in ("pair", "cluster", "all"):
        _error_line(f"--kind '{kind}': expected pair, cluster or all")
        raise typer.Exit(code=2)
    try:
        engine = _engine(config)
        queue = review.full_queue(engine, kind, source, min_score, max_score, min_size)
        engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None
    shown = queue.head(limit)
    if json_output:
        _frame_json(shown)
        return
    table = Table(title=f"review queue: {len(queue):,} items, most uncertain first")
    for col in ("item", "kind", "records", "probability", "rule", "golden IDs", "size"):
        table.add_column(col, justify="right" if col in ("probability", "size") else "left")
    for row in shown.itertuples(index=False):
        table.add_row(
            row.item,
            row.kind,
            row.records,
            f"{row.probability:.3f}",
            str(row.rule),
            row.golden,
            str(row.size),
        )
    out.print(table)


@review_app.command("show")
def review_show(
    config: ConfigOption,
    item: Annotated[str, typer.Argument(help="A review item ID (from `mdm review list`).")],
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """The two records side by side, raw and normalised, with each comparison's weight."""
    from mdm_pipeline.config.loader import load_settings
    from mdm_pipeline.golden_records import review
    from mdm_pipeline.pipeline.review import every_field, pair_levels

    try:
        engine = _engine(config)
        shown = review.show_pair(engine, item)
        engine.dispose()
        for side in (shown["left"], shown["right"]):
            side["values"] = every_field(side["values"])
        shown["levels"] = pair_levels(load_settings(config).matching, shown["left"], shown["right"])
    except Exception as exc:
        raise _fail(exc, debug) from None
    if json_output:
        out.print_json(json.dumps(shown, default=str))
        return
    left, right = shown["left"], shown["right"]
    table = Table(
        title=f"{item}: {left['ref']} / {right['ref']}, probability "
        f"{shown['probability']:.3f} (weight {shown['weight']:+.2f}, rule {shown['rule']})"
    )
    for col in ("field", left["ref"], right["ref"], "level", "weight"):
        table.add_column(col, justify="right" if col == "weight" else "left")
    weights = shown["contributions"]
    levels = shown["levels"]
    for label, raw, norm, comparison in SHOWN_FIELDS:
        values = []
        for rec in (left, right):
            r, n = rec["values"].get(raw), rec["values"].get(norm)
            text = "" if r is None else str(r)
            if n is not None and str(n) != text:
                text = f"{text} → {n}" if text else str(n)
            values.append(text)
        if not any(values):
            continue
        w = weights.get(comparison) if comparison else None
        style = "" if w is None else ("green" if w > 0 else "red" if w < 0 else "")
        level = levels.get(comparison, "") if comparison else ""
        table.add_row(label, *values, level, "" if w is None else f"{w:+.2f}", style=style)
    for name, w in weights.items():
        if name not in {c for *_, c in SHOWN_FIELDS}:
            style = "green" if w > 0 else "red" if w < 0 else ""
            table.add_row(f"({name})", "", "", levels.get(name, ""), f"{w:+.2f}", style=style)
    out.print(table)
    for decision in shown["decisions"]:
        out.print(
            f"decision {decision['decision_id']}: {decision['kind']} by {decision['author']} "
            f"on {decision['decided_at']}",
            highlight=False,
        )


def _decide(
    config: Path,
    kind: str,
    refs: tuple[str, str] | str,
    author: str,
    comment: str | None,
    debug: bool,
) -> None:
    from mdm_pipeline.golden_records import review

    try:
        engine = _engine(config)
        if isinstance(refs, str):
            ids = review.decide_item(engine, refs, kind, author, comment)
            what = refs
        else:
            left, right = (review.RecordRef.parse(r) for r in refs)
            ids = [review.decide(engine, kind, left, right, author, comment)]
            what = f"{left} / {right}"
        engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None
    numbers = ", ".join(str(i) for i in ids)
    out.print(f"decision {numbers}: {kind} {what}, honoured from the next run", highlight=False)


@review_app.command("accept")
def review_accept(
    config: ConfigOption,
    item: Annotated[str, typer.Argument(help="The review item ID.")],
    author: AuthorOption,
    comment: CommentOption = None,
    debug: DebugOption = False,
) -> None:
    """The pair is one customer: a must-link every later run honours."""
    _decide(config, "must_link", item, author, comment, debug)


@review_app.command("reject")
def review_reject(
    config: ConfigOption,
    item: Annotated[str, typer.Argument(help="The review item ID.")],
    author: AuthorOption,
    comment: CommentOption = None,
    debug: DebugOption = False,
) -> None:
    """The pair is two customers: a cannot-link every later run honours."""
    _decide(config, "cannot_link", item, author, comment, debug)


@review_app.command("merge")
def review_merge(
    config: ConfigOption,
    left: Annotated[str, typer.Argument(help="SOURCE:KEY of one record.")],
    right: Annotated[str, typer.Argument(help="SOURCE:KEY of the other.")],
    author: AuthorOption,
    comment: CommentOption = None,
    debug: DebugOption = False,
) -> None:
    """Put two records (and so their golden records) together: a must-link."""
    _decide(config, "must_link", (left, right), author, comment, debug)


@review_app.command("split")
def review_split(
    config: ConfigOption,
    left: Annotated[str, typer.Argument(help="SOURCE:KEY of one record.")],
    right: Annotated[str, typer.Argument(help="SOURCE:KEY of the other.")],
    author: AuthorOption,
    comment: CommentOption = None,
    debug: DebugOption = False,
) -> None:
    """Keep two records in different golden records: a cannot-link."""
    _decide(config, "cannot_link", (left, right), author, comment, debug)


@review_app.command("revoke")
def review_revoke(
    config: ConfigOption,
    decision: Annotated[int, typer.Argument(help="The decision's number.")],
    author: AuthorOption,
    comment: CommentOption = None,
    debug: DebugOption = False,
) -> None:
    """End a decision: runs from the next one on no longer honour it."""
    from mdm_pipeline.golden_records import review

    try:
        engine = _engine(config)
        review.revoke(engine, decision, author, comment)
        engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None
    out.print(f"decision {decision} revoked", highlight=False)


@review_app.command("decisions")
def review_decisions(
    config: ConfigOption,
    all_decisions: Annotated[bool, typer.Option("--all", help="Revoked ones too.")] = False,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """The stewards' decisions with author, date and comment."""
    from mdm_pipeline.golden_records import review

    try:
        engine = _engine(config)
        found = review.list_decisions(engine, all_decisions)
        engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None
    if json_output:
        _frame_json(found)
        return
    table = Table(title=f"{len(found):,} decisions")
    for col in ("id", "kind", "left", "right", "author", "decided", "comment", "revoked"):
        table.add_column(col)
    for row in found.itertuples(index=False):
        table.add_row(
            str(row.decision_id),
            row.kind,
            f"{row.left_source}:{row.left_key}",
            f"{row.right_source}:{row.right_key}",
            row.author,
            f"{row.decided_at:%Y-%m-%d %H:%M}",
            row.comment or "",
            ""
            if row.revoked_at is None or row.revoked_at != row.revoked_at
            else f"{row.revoked_at:%Y-%m-%d} by {row.revoked_by}",
        )
    out.print(table)


@review_app.command("apply")
def review_apply(
    config: ConfigOption,
    decisions_csv: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns decision (accept, reject, merge, split), item or "
            "left+right (SOURCE:KEY), author, and optionally comment."
        ),
    ],
    debug: DebugOption = False,
) -> None:
    """Record many decisions at once: all of them, or none if one line is wrong."""
    from mdm_pipeline.golden_records import review

    try:
        engine = _engine(config)
        ids = review.apply_csv(engine, decisions_csv)
        engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None
    out.print(f"{len(ids)} decisions recorded from {decisions_csv}", highlight=False)


# --- auditors' questions -----------------------------------------------------------------

golden_app = typer.Typer(
    help="What a golden record says, said, and where it came from.", no_args_is_help=True
)
app.add_typer(golden_app, name="golden")


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def _values_table(title: str, attributes: dict[str, Any], lineage: dict[str, Any]) -> Table:
    table = Table(title=title)
    for col in ("attribute", "value", "from", "rule", "dated"):
        table.add_column(col)
    for name, value in attributes.items():
        if value is None:
            continue
        origin = lineage.get(name, {})
        table.add_row(
            name,
            str(value),
            f"{origin.get('source', '')}:{origin.get('source_key', '')}" if origin else "",
            origin.get("rule", ""),
            origin.get("date", ""),
        )
    return table


def _audit(config: Path, debug: bool, call: Any) -> Any:
    try:
        engine = _engine(config)
        try:
            return call(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        raise _fail(exc, debug) from None


@golden_app.command("show")
def golden_show(
    config: ConfigOption,
    golden_id: Annotated[str, typer.Argument(help="A golden ID (a retired one resolves).")],
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Current values with the source record, rule and date behind each."""
    from mdm_pipeline.golden_records import audit

    shown = _audit(config, debug, lambda e: audit.golden_show(e, golden_id))
    if json_output:
        _print_json(shown)
        return
    if shown["resolved_from"]:
        out.print(
            f"{golden_id} was merged into {shown['golden_id']} "
            f"(through {', '.join(shown['resolved_from'])})",
            highlight=False,
        )
    out.print(
        _values_table(
            f"{shown['golden_id']} ({shown['record_type']}, version {shown['version']} "
            f"since {shown['valid_from']:%Y-%m-%d %H:%M})",
            shown["attributes"],
            shown["lineage"],
        )
    )
    out.print(f"members: {', '.join(shown['members'])}", highlight=False)


@golden_app.command("history")
def golden_history(
    config: ConfigOption,
    golden_id: Annotated[str, typer.Argument(help="A golden ID, active or retired.")],
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Versions, merges, splits, retirement and steward decisions, by date."""
    from mdm_pipeline.golden_records import audit

    found = _audit(config, debug, lambda e: audit.golden_history(e, golden_id))
    if json_output:
        _print_json(found)
        return
    table = Table(title=f"history of {golden_id} ({found['status']})")
    for col in ("date", "what", "run", "detail"):
        table.add_column(col)
    for h in found["history"]:
        what = h["what"]
        if what == "version":
            detail = f"v{h['version']}, {h['members']} records" + (
                f"; changed: {', '.join(h['changed'])}" if h["changed"] else ""
            )
        elif what in ("merge", "split"):
            before = ", ".join(h["detail"]["before"])
            after = ", ".join(h["detail"]["after"])
            detail = f"{h['reason']}: {before} → {after}"
        elif what == "retired":
            detail = f"merged into {h['survivor_id']}" if h["survivor_id"] else "no records left"
        elif what == "decision":
            detail = (
                f"#{h['decision_id']} {h['kind']} {h['left_source']}:{h['left_key']} / "
                f"{h['right_source']}:{h['right_key']} by {h['author']}"
                + (f" ({h['comment']})" if h["comment"] else "")
            )
        else:
            detail = f"#{h['decision_id']} revoked by {h['revoked_by']}"
        at = h["at"]
        table.add_row(
            f"{at:%Y-%m-%d %H:%M}" if at is not None else "", what, h.get("run_id") or "", detail
        )
    out.print(table)


@golden_app.command("as-of")
def golden_as_of(
    config: ConfigOption,
    golden_id: Annotated[str, typer.Argument(help="A golden ID.")],
    date: Annotated[str, typer.Option("--date", help="YYYY-MM-DD or YYYY-MM-DDTHH:MM.")],
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """What the golden record said at a date (the end of that day if no time is given)."""
    from datetime import datetime, timedelta

    from mdm_pipeline.golden_records import audit

    try:
        when = datetime.fromisoformat(date)
    except ValueError:
        _error_line(f"--date '{date}': expected YYYY-MM-DD or YYYY-MM-DDTHH:MM")
        raise typer.Exit(code=2) from None
    if len(date) == 10:
        when += timedelta(days=1) - timedelta(microseconds=1)
    shown = _audit(config, debug, lambda e: audit.golden_as_of(e, golden_id, when))
    if json_output:
        _print_json(shown)
        return
    out.print(
        _values_table(
            f"{golden_id} as of {when:%Y-%m-%d %H:%M}: version {shown['version']} "
            f"(run {shown['run_id']}, {shown['members']} records)",
            shown["attributes"],
            shown["lineage"],
        )
    )


@app.command()
def why(
    config: ConfigOption,
    left: Annotated[str, typer.Argument(help="SOURCE:KEY of one record.")],
    right: Annotated[str, typer.Argument(help="SOURCE:KEY of the other.")],
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Are two records in one golden record, since when, and on what evidence."""
    from mdm_pipeline.golden_records import audit
    from mdm_pipeline.golden_records.refs import RecordRef

    def ask(engine: Any) -> Any:
        return audit.why(engine, RecordRef.parse(left), RecordRef.parse(right))

    found = _audit(config, debug, ask)
    if json_output:
        _print_json(found)
        return
    gids = found["golden_ids"]
    if found["together"]:
        since = found["since"]
        out.print(
            f"{left} and {right} are together in {gids[left]}"
            + (f" since {since:%Y-%m-%d %H:%M}" if since is not None else ""),
            highlight=False,
        )
    else:
        out.print(
            f"{left} ({gids[left]}) and {right} ({gids[right]}) are in different golden records",
            highlight=False,
        )
    links = [found["evidence"]] if found["evidence"] else []
    if found["chain"]:
        out.print("no direct auto-match: joined through this chain of links", highlight=False)
        links = found["chain"]
    for link in links:
        table = Table(
            title=f"{link['left']} / {link['right']}: {link['band']}, probability "
            f"{link['probability']:.3f}, weight {link['weight']:+.2f}, blocking rule {link['rule']}"
        )
        table.add_column("comparison")
        table.add_column("weight", justify="right")
        for name, w in link["contributions"].items():
            table.add_row(name, f"{w:+.2f}", style="green" if w > 0 else "red" if w < 0 else "")
        out.print(table)
    if not links:
        out.print("no stored evidence on this pair (scored as a non-match, or never compared)")
    for d in found["decisions"]:
        state = "revoked" if d["revoked_at"] is not None else "in force"
        out.print(
            f"steward decision #{d['decision_id']}: {d['kind']} by {d['author']} on "
            f"{d['decided_at']:%Y-%m-%d %H:%M} ({state})"
            + (f": {d['comment']}" if d["comment"] else ""),
            highlight=False,
        )


# --- files out of the store --------------------------------------------------------------

export_app = typer.Typer(help="Files out of the store.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("bu")
def export_bu(
    config: ConfigOption,
    name: Annotated[str, typer.Argument(help="The business unit (a source's name).")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder (default: the config's export.dir).")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """The unit's extract back in its own format, each row with what the store knows."""
    from mdm_pipeline.config.loader import load_settings
    from mdm_pipeline.pipeline.exports import export_bu as write

    try:
        path = write(load_settings(config), name, out_dir)
    except Exception as exc:
        raise _fail(exc, debug) from None
    out.print(f"return file: {path}", highlight=False)


@export_app.command("golden")
def export_golden(
    config: ConfigOption,
    path: Annotated[Path, typer.Option("--out", help="A .csv or .parquet file to write.")],
    debug: DebugOption = False,
) -> None:
    """The active golden records, one column per attribute (CSV or Parquet)."""
    from mdm_pipeline.config.loader import load_settings
    from mdm_pipeline.pipeline.exports import export_golden as write

    try:
        n = write(load_settings(config), path)
    except Exception as exc:
        raise _fail(exc, debug) from None
    out.print(f"{n:,} golden records written to {path}", highlight=False)


@app.command()
def report(
    config: ConfigOption,
    run_id: Annotated[str | None, typer.Argument(help="A run ID (default: the last).")] = None,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Where a run's HTML report is, and its figures with the change since the run before."""
    from mdm_pipeline.config.errors import MdmError
    from mdm_pipeline.config.loader import load_settings

    try:
        settings = load_settings(config)
        folder = settings.resolve(settings.export.dir) / "reports"
        found = sorted(folder.glob("R*.json")) if folder.is_dir() else []
        if run_id is not None:
            found = [f for f in found if f.stem == run_id]
        if not found:
            what = f"run {run_id}" if run_id else "any run"
            raise MdmError(f"no report of {what} in {folder}")
        data = json.loads(found[-1].read_text(encoding="utf-8"))
    except Exception as exc:
        raise _fail(exc, debug) from None
    page = found[-1].with_suffix(".html")
    if json_output:
        _print_json({"html": str(page), **data})
        return
    out.print(f"run report: {page}", highlight=False)
    table = Table(title=f"run {data['run_id']} ({data['mode']})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column(f"since {data['previous_run'] or '-'}", justify="right")
    change = data["change_since_previous"]
    for key, value in data["figures"].items():
        delta = change.get(key)
        table.add_row(key.replace("_", " "), f"{value:,}", f"{delta:+,}" if delta else "")
    out.print(table)
    for reason in data["quarantine_reasons"]:
        out.print(
            f"quarantine {reason['source']}: {reason['rows']:,} × {reason['reason']}",
            highlight=False,
        )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        _error_line("interrupted; the store was left as it was")
        sys.exit(1)
