"""The run report: what a steward looks at in the morning, as HTML and the same data
as JSON.

Built from frames the run already holds (records, pairs, clusters, quarantine),
with numpy/pandas aggregates only; charts are inline SVG, so the file opens
anywhere, offline, with nothing to load. No customer value appears in it:
counts, rates and distributions only, sources and reasons by name.
"""

from __future__ import annotations

import html
import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Fields whose completeness is reported per business unit: (label, column).
QUALITY_FIELDS = (
    ("last name", "last_name_norm"),
    ("first name", "first_name_norm"),
    ("birth date", "birth_date"),
    ("e-mail", "email_norm"),
    ("phone", "phone_norm"),
    ("address", "rnvp_line6"),
    ("company", "company_name_norm"),
)


def _rate(part: pd.Series, whole: int) -> float:
    return round(float(part.sum()) / whole, 4) if whole else 0.0


def quality(records: pd.DataFrame) -> list[dict[str, Any]]:
    """Per source: completeness of key fields, validity of e-mail, phone and address,
    and the NPAI rate."""
    # Each measure is a boolean column computed once over all records, then counted
    # per source: splitting the frame by source copies every one of its ~80 columns
    # (1.5 s for a night's 95k records, ten times that in a full run).
    read = [c for _, c in QUALITY_FIELDS] + [
        "email_norm",
        "email_valid",
        "phone_norm",
        "phone_valid",
    ]
    present = {c: records[c].notna().to_numpy(dtype=bool) for c in read if c in records}
    # Flags and statuses too, once each, not once per source (a night's report took a
    # quarter of a second converting the whole status column for each source).
    true = {
        c: records[c].eq(True).fillna(False).to_numpy(dtype=bool)
        for c in ("email_valid", "phone_valid", "npai_flag")
        if c in records
    }
    # Hashed, not sorted: sources in order of first appearance. Their names and the
    # address statuses are counted by code: made Python texts first, a full run's
    # million of each took 0.4 s of its report's 0.6 s.
    codes, sources = pd.factorize(records["source"], use_na_sentinel=False)
    per_status = None
    if "address_status" in records:
        status_codes, statuses = pd.factorize(records["address_status"].fillna("missing"))
        per_status = np.bincount(
            codes * len(statuses) + status_codes, minlength=len(sources) * len(statuses)
        ).reshape(len(sources), len(statuses))
    out = []
    for i, source in enumerate(sources):
        here = codes == i
        n = int(here.sum())
        row: dict[str, Any] = {"source": str(source), "records": n, "complete": {}}
        for label, col in QUALITY_FIELDS:
            if col in records:
                row["complete"][label] = _rate(present[col][here], n)
        for kind in ("email", "phone"):
            valid, norm = f"{kind}_valid", f"{kind}_norm"
            if valid in records:
                has = present[norm if norm in records else valid][here]
                row[valid] = _rate(true[valid][here], int(has.sum()))
        if per_status is not None:
            # The most frequent first, as `value_counts` lists them.
            counts = per_status[i]
            row["address_status"] = {
                str(statuses[j]): int(counts[j])
                for j in np.argsort(-counts, kind="stable")
                if counts[j]
            }
        if "npai_flag" in records:
            row["npai_rate"] = _rate(true["npai_flag"][here], n)
        out.append(row)
    return out


def histogram(values: np.ndarray, bins: int = 24) -> dict[str, list[float]]:
    """Counts per equal-width bin (edges included)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()}


def cluster_sizes(labels: np.ndarray) -> dict[str, int]:
    """How many clusters have 1, 2, 3… records."""
    sizes = np.bincount(np.bincount(np.asarray(labels, dtype=np.int64)))
    return {str(size): int(n) for size, n in enumerate(sizes) if size and n}


def build(
    summary: Any,
    records: pd.DataFrame,
    weights: np.ndarray,
    labels: np.ndarray,
    quarantined: pd.DataFrame,
    review_backlog: int,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report's data (also written as JSON)."""
    reasons = (
        quarantined.groupby(["source", "reason"]).size().reset_index(name="rows")
        if len(quarantined)
        else pd.DataFrame(columns=["source", "reason", "rows"])
    )
    figures = {
        "records": int(sum(s.records for s in summary.sources)),
        "quarantined": int(sum(s.quarantined for s in summary.sources)),
        "candidate_pairs": summary.candidate_pairs,
        "auto_matched_pairs": summary.matched_edges,
        "review_pairs": summary.review_pairs,
        "clusters": summary.clusters,
        "golden_created": summary.golden_created,
        "golden_updated": summary.golden_updated,
        "golden_retired": summary.golden_retired,
        "merges": summary.merges,
        "splits": summary.splits,
        "npai_flags_active": summary.npai_flags_active,
        "review_backlog": review_backlog,
    }
    change = {}
    if previous:
        before = previous.get("figures", {})
        change = {k: v - before[k] for k, v in figures.items() if isinstance(before.get(k), int)}
    return {
        "run_id": summary.run_id,
        "mode": summary.mode,
        "previous_run": previous.get("run_id") if previous else None,
        "figures": figures,
        "change_since_previous": change,
        "sources": [asdict(s) for s in summary.sources],
        "seconds": summary.seconds,
        "peak_rss_mib": summary.peak_rss_mib,
        "quarantine_reasons": reasons.to_dict(orient="records"),
        "quality": quality(records),
        "quality_scope": "all records" if summary.mode == "full" else "records re-decided tonight",
        "match_weights": histogram(weights),
        "cluster_sizes": cluster_sizes(labels),
        "largest_cluster": summary.largest_cluster,
        "clusters_split": summary.clusters_split,
    }


# --- HTML ---------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:70rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}
td,th{padding:.25rem .6rem;border-bottom:1px solid #eee}
th{text-align:left;background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #ddd;border-radius:.4rem;
padding:.6rem 1rem;min-width:9rem}.card b{display:block;font-size:1.4rem}
.up{color:#1a7f37}.down{color:#b42318}.bad{background:#fde7e7}.ok{background:#e7f6ea}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><tr>", *[f"<th>{_e(h)}</th>" for h in head], "</tr>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="n"' if i in numeric else ""
            out.append(f"<td{cls}>{cell if isinstance(cell, _Raw) else _e(cell)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


class _Raw(str):
    """HTML already escaped (a coloured cell)."""


def _bars(labels: list[str], counts: list[int], title: str) -> str:
    """A bar chart as inline SVG."""
    if not counts:
        return "<p>none</p>"
    width, height, pad = 640, 180, 30
    top = max(counts) or 1
    step = (width - pad) / len(counts)
    bars = []
    for i, (label, n) in enumerate(zip(labels, counts, strict=True)):
        h = (height - pad) * n / top
        x = pad + i * step
        bars.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="#4a78c2"><title>{_e(label)}: {n:,}</title></rect>'
        )
        if len(counts) <= 12 or i % max(len(counts) // 8, 1) == 0:
            bars.append(
                f'<text x="{x + step / 2:.1f}" y="{height - 10}" font-size="10" '
                f'text-anchor="middle">{_e(label)}</text>'
            )
    return (
        f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{"".join(bars)}</svg>'
    )


def render(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    f = report["figures"]
    change = report["change_since_previous"]

    def card(label: str, key: str) -> str:
        delta = change.get(key)
        shown = ""
        if delta:
            shown = f' <span class="{"up" if delta > 0 else "down"}">({delta:+,})</span>'
        return f'<div class="card">{_e(label)}<b>{f[key]:,}</b>{shown}</div>'

    cards = "".join(
        card(label, key)
        for label, key in (
            ("records", "records"),
            ("quarantined", "quarantined"),
            ("golden records created", "golden_created"),
            ("updated", "golden_updated"),
            ("retired", "golden_retired"),
            ("merges", "merges"),
            ("splits", "splits"),
            ("review backlog", "review_backlog"),
            ("NPAI flags", "npai_flags_active"),
        )
    )
    sources = _table(
        ["source", "rows read", "records", "quarantined", "duplicate keys"],
        [
            [
                s["name"],
                f"{s['rows_read']:,}",
                f"{s['records']:,}",
                f"{s['quarantined']:,}",
                f"{s['duplicates']:,}",
            ]
            for s in report["sources"]
        ],
        {1, 2, 3, 4},
    )
    stages = _table(
        ["stage", "seconds"],
        [[k, f"{v:.1f}"] for k, v in report["seconds"].items()],
        {1},
    )
    reasons = _table(
        ["source", "reason", "rows"],
        [[r["source"], r["reason"], f"{r['rows']:,}"] for r in report["quarantine_reasons"]],
        {2},
    )
    labels = [label for label, _ in QUALITY_FIELDS]
    quality_rows = []
    for q in report["quality"]:
        row: list[Any] = [q["source"], f"{q['records']:,}"]
        for label in labels:
            rate = q["complete"].get(label)
            row.append("" if rate is None else f"{rate:.0%}")
        for key in ("email_valid", "phone_valid"):
            rate = q.get(key)
            row.append(
                ""
                if rate is None
                else _Raw(f'<span class="{"ok" if rate >= 0.9 else "bad"}">{rate:.0%}</span>')
            )
        status = q.get("address_status", {})
        total = sum(status.values()) or 1
        row.append(f"{(status.get('valid', 0) + status.get('corrected', 0)) / total:.0%}")
        npai_rate = q.get("npai_rate")
        row.append("" if npai_rate is None else f"{npai_rate:.1%}")
        quality_rows.append(row)
    quality = _table(
        ["source", "records", *labels, "e-mail valid", "phone valid", "address OK", "NPAI"],
        quality_rows,
        set(range(1, len(labels) + 6)),
    )
    weights = report["match_weights"]
    edges = weights["edges"]
    weight_chart = _bars(
        [f"{(a + b) / 2:.0f}" for a, b in itertools.pairwise(edges)],
        weights["counts"],
        "match weight histogram",
    )
    sizes = report["cluster_sizes"]
    size_chart = _bars(list(sizes), list(sizes.values()), "cluster sizes")
    previous = report["previous_run"] or "none"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>mdm run {_e(report["run_id"])}</title><style>{_STYLE}</style></head>
<body>
<h1>Run {_e(report["run_id"])} ({_e(report["mode"])})</h1>
<p>Change in brackets: since run {_e(previous)}.</p>
<div class="cards">{cards}</div>
<h2>Sources</h2>{sources}
<h2>Stages</h2>{stages}<p>Peak memory {report["peak_rss_mib"]:,.0f} MiB.</p>
<h2>Quarantine reasons</h2>{reasons}
<h2>Data quality per business unit ({_e(report["quality_scope"])})</h2>{quality}
<h2>Match weights of candidate pairs</h2>{weight_chart}
<p>{f["auto_matched_pairs"]:,} auto-matched, {f["review_pairs"]:,} for review,
of {f["candidate_pairs"]:,} candidate pairs.</p>
<h2>Cluster sizes</h2>{size_chart}
<p>Largest cluster {report["largest_cluster"]}; {report["clusters_split"]} split by the chaining
guard; review backlog {f["review_backlog"]:,} pairs (<code>mdm review list</code>).</p>
</body></html>
"""


def write(report: dict[str, Any], folder: Path) -> Path:
    """`RUN_ID.json` and `RUN_ID.html` in `folder`; returns the HTML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{report['run_id']}.json").write_text(
        json.dumps(report, indent=1, default=str), encoding="utf-8"
    )
    page = folder / f"{report['run_id']}.html"
    page.write_text(render(report), encoding="utf-8")
    return page


def latest(folder: Path) -> dict[str, Any] | None:
    """The most recent report in `folder` (run IDs sort by time)."""
    found = sorted(folder.glob("R*.json")) if folder.is_dir() else []
    return json.loads(found[-1].read_text(encoding="utf-8")) if found else None
