"""Renderings of a :class:`GoodputReport`: a terminal table, JSON, and a self-contained HTML page."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html as _html
from pathlib import Path
from typing import Any

from stalwart.goodput.accounting import CATEGORIES, PRODUCTIVE, GoodputReport
from stalwart.goodput.incidents import Incident


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _pct(seconds: float, wall: float) -> float:
    return 100.0 * seconds / wall if wall > 0 else 0.0


def _fmt_opt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def category_rows(report: GoodputReport) -> list[tuple[str, float, float]]:
    """(name, seconds, percent of wall) for productive time, then every badput category."""
    return [(c, report.seconds(c), _pct(report.seconds(c), report.wall_seconds)) for c in (PRODUCTIVE, *CATEGORIES)]


def format_text(report: GoodputReport) -> str:
    """The report as a terminal table: totals, every category, then one line per incident."""
    lines = [
        f"window      {_iso(report.wall_start)} .. {_iso(report.wall_end)}",
        f"wall time   {report.wall_seconds:,.2f} s",
        f"goodput     {100.0 * report.goodput:.2f} %",
        (
            f"steps       {report.steps_kept} kept, {report.steps_lost} lost, last step {_fmt_opt(report.last_step)}, "
            f"{report.incarnations} incarnation(s)"
        ),
        "",
        f"{'category':<20}{'seconds':>14}{'% wall':>9}",
    ]
    for name, seconds, pct in category_rows(report):
        lines.append(f"{name:<20}{seconds:>14,.2f}{pct:>8.2f}%")
    lines.append(
        f"{'total':<20}{sum(s for _, s, _ in category_rows(report)):>14,.2f}"
        f"{100.0 if report.wall_seconds else 0.0:>8.2f}%"
    )
    if report.events_dropped or report.event_write_failures:
        lines += [
            "",
            f"event log   {report.events_dropped} events dropped, {report.event_write_failures} failed writes retried "
            "(a full or failing disk under RUN/events): the figures above miss what was dropped",
        ]
    skewed = {h: o for h, o in report.clock_offsets.items() if o}
    if skewed:
        lines += ["", "clock offsets applied: " + ", ".join(f"{h} {o:+.3f} s" for h, o in sorted(skewed.items()))]
    numbered = list(enumerate(report.incidents, 1))  # numbered in time order, as on the timeline plot
    faults = [(n, i) for n, i in numbered if not i.planned]
    planned = [(n, i) for n, i in numbered if i.planned]
    lines += ["", f"incidents   {len(faults)} fault(s), {len(planned)} planned"]
    for title, group in (("faults", faults), ("planned", planned)):
        if group:
            lines += ["", *_incident_table(title, group)]
    return "\n".join(lines) + "\n"


INCIDENT_COLUMNS = ("time (UTC)", "kind", "target", "found by", "detect s", "down s", "lost steps", "restored")


def incident_cells(i: Incident) -> tuple[str, ...]:
    """One incident's table cells, in :data:`INCIDENT_COLUMNS` order (text and HTML share them)."""
    return (
        _iso(i.ts)[11:],
        i.kind,
        i.target,
        i.detector or "-",
        _fmt_opt(i.detection_latency),
        f"{i.downtime:.2f}",
        str(i.lost_steps),
        _fmt_opt(i.restored_step),
    )


def _incident_table(title: str, incidents: list[tuple[int, Incident]]) -> list[str]:
    """A table of (number, incident), then each one's sentence with its consequences beneath."""
    header = ("#", *INCIDENT_COLUMNS)
    rows = [(str(n), *incident_cells(i)) for n, i in incidents]
    widths = [max(len(r[k]) for r in (header, *rows)) for k in range(len(header))]
    lines = [f"{title}:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    for n, i in incidents:
        lines += ["", f"  {n}. {i.summary}"]
        lines += [f"       {_iso(c.ts)[11:19]}  {c.text}" for c in i.consequences]
        lines += [f"       stacks: {p}" for p in i.evidence.get("stacks", [])]
    return lines


def incident_dict(i: Incident) -> dict[str, Any]:
    """An incident as plain JSON: the report's JSON and the controller's /api/state both use this."""
    return dataclasses.asdict(i)


def to_json(report: GoodputReport, include_timeline: bool = False) -> dict[str, Any]:
    """Plain JSON-ready dict; the per-segment and per-step timelines only on request (they are long)."""
    out = {
        "wall_start": report.wall_start,
        "wall_end": report.wall_end,
        "wall_seconds": report.wall_seconds,
        "productive_seconds": report.productive_seconds,
        "goodput": report.goodput,
        "badput": dict(report.badput),
        "steps_kept": report.steps_kept,
        "steps_lost": report.steps_lost,
        "last_step": report.last_step,
        "incarnations": report.incarnations,
        "clock_offsets": dict(report.clock_offsets),
        "events_dropped": report.events_dropped,
        "event_write_failures": report.event_write_failures,
        "incidents": [incident_dict(i) for i in report.incidents],
    }
    if include_timeline:
        out["segments"] = [dataclasses.asdict(s) for s in report.segments]
        out["steps"] = [dataclasses.asdict(s) for s in report.steps]
    return out


_COLORS = {
    PRODUCTIVE: "#2ca02c",
    "startup": "#9467bd",
    "checkpoint_save": "#1f77b4",
    "checkpoint_load": "#17becf",
    "lost_progress": "#d62728",
    "detection_latency": "#ff7f0e",
    "restart_downtime": "#8c564b",
    "data_stall": "#bcbd22",
    "hot_spare_wait": "#e377c2",
    "other": "#c7c7c7",
}


def _figure_png(fig) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: GoodputReport) -> list[tuple[str, str]]:
    """(title, PNG data URI) for the timeline, step time and loss, and rolling goodput."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from stalwart.goodput.accounting import rolling_goodput

    t0 = report.wall_start

    def rel(t: float) -> float:
        return t - t0

    plots = []

    fig, ax = plt.subplots(figsize=(11, 2.4))
    for cat in (PRODUCTIVE, *CATEGORIES):
        bars = [(rel(s.start), s.end - s.start) for s in report.segments if s.category == cat]
        if bars:
            ax.broken_barh(bars, (0, 1), facecolors=_COLORS[cat])
    for n, inc in enumerate(report.incidents, 1):
        ax.axvline(rel(inc.ts), color="gray" if inc.planned else "black", linestyle="--", linewidth=1)
        ax.annotate(f"{n} {inc.kind}", (rel(inc.ts), 1.02), fontsize=7, rotation=30, annotation_clip=False)
    ax.set_ylim(0, 1.4)
    ax.set_yticks([])
    ax.set_xlim(0, max(report.wall_seconds, 1e-9))
    ax.set_xlabel("seconds since start of window")
    present = [c for c in (PRODUCTIVE, *CATEGORIES) if report.seconds(c) > 0]
    ax.legend(
        handles=[Patch(color=_COLORS[c], label=c) for c in present],
        ncol=5,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.45),
    )
    plots.append(("Timeline (dashed: incidents)", _figure_png(fig)))

    fig, ax1 = plt.subplots(figsize=(11, 3))
    steps = [s for s in report.steps if report.wall_start <= s.end <= report.wall_end]
    for kept, color, label in ((True, "#2ca02c", "step time (kept)"), (False, "#d62728", "step time (lost)")):
        pts = [(rel(s.end), s.end - s.start) for s in steps if s.kept == kept]
        if pts:
            ax1.scatter(*zip(*pts), s=8, color=color, label=label)
    ax1.set_xlabel("seconds since start of window")
    ax1.set_ylabel("step time (s)")
    ax2 = ax1.twinx()
    loss = [(rel(s.end), s.loss) for s in steps if s.loss is not None]
    if loss:
        ax2.plot(*zip(*loss), color="#1f77b4", linewidth=1, label="loss")
    ax2.set_ylabel("loss")
    handles = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if handles:
        ax1.legend(handles=handles, fontsize=7, loc="upper right")
    plots.append(("Step time and loss", _figure_png(fig)))

    window = max(report.wall_seconds / 20.0, 1e-9)
    times, values = rolling_goodput(report, window)
    fig, ax = plt.subplots(figsize=(11, 2.6))
    if times:
        ax.plot([rel(t) for t in times], [100.0 * v for v in values], color="#2ca02c")
    ax.axhline(100.0 * report.goodput, color="gray", linestyle=":", label=f"overall {100.0 * report.goodput:.1f} %")
    ax.set_ylim(0, 105)
    ax.set_ylabel("goodput %")
    ax.set_xlabel("seconds since start of window")
    ax.legend(fontsize=7, loc="lower right")
    plots.append((f"Rolling goodput (trailing {window:,.1f} s window)", _figure_png(fig)))
    return plots


def render_html(report: GoodputReport, events: list[dict[str, Any]] | None = None) -> str:
    """One self-contained HTML page (plots inlined as PNG data URIs; no external resources)."""
    esc = _html.escape
    rows = "".join(
        f'<tr data-category="{esc(n)}"><td>{esc(n)}</td><td class="seconds">{s:,.2f}</td><td '
        f'class="pct">{p:.2f}%</td></tr>'
        for n, s, p in category_rows(report)
    )
    numbered = list(enumerate(report.incidents, 1))
    incident_tables = _incidents_html("Faults", "incidents", [(n, i) for n, i in numbered if not i.planned])
    incident_tables += _incidents_html("Planned", "planned", [(n, i) for n, i in numbered if i.planned])
    counts: dict[str, int] = {}
    for e in events or []:
        counts[str(e.get("kind"))] = counts.get(str(e.get("kind")), 0) + 1
    count_text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "not given"
    figures = "".join(f'<h2>{esc(t)}</h2><img alt="{esc(t)}" src="{uri}">' for t, uri in _plots(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>stalwart goodput report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
tr.story td {{ text-align: left; border-top: none; color: #333; }}
tr.story ul {{ margin: 2px 0 6px 1.2em; padding: 0; }}
.big {{ font-size: 2em; font-weight: bold; }}
</style></head><body>
<h1>Goodput report</h1>
<p class="big" id="goodput">goodput <span id="goodput-pct">{100.0 * report.goodput:.2f} %</span></p>
<p>window {esc(_iso(report.wall_start))} .. {esc(_iso(report.wall_end))}
(<span id="wall-seconds">{report.wall_seconds:,.2f}</span> s wall);
steps {report.steps_kept} kept, {report.steps_lost} lost; {report.incarnations} incarnation(s);
events: {esc(count_text)}</p>
<table id="categories"><tr><th>category</th><th>seconds</th><th>% wall</th></tr>{rows}</table>
{incident_tables}
{figures}
</body></html>
"""


def _incidents_html(title: str, table_id: str, incidents: list[tuple[int, Incident]]) -> str:
    """A table of incidents: their cells, then a row with the sentence and the consequences folded under it."""
    esc = _html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in ("#", *INCIDENT_COLUMNS))
    rows = []
    for n, i in incidents:
        cells = "".join(f"<td>{esc(c)}</td>" for c in (str(n), *incident_cells(i)))
        stacks = "".join(
            f'<li>stacks: <a href="{esc(Path(p).resolve().as_uri())}">{esc(Path(p).name)}</a></li>'
            for p in i.evidence.get("stacks", [])
        )
        items = "".join(f"<li>{esc(_iso(c.ts)[11:19])} {esc(c.text)}</li>" for c in i.consequences)
        story = (
            f'<tr class="story"><td></td><td colspan="{len(INCIDENT_COLUMNS)}"><span class="summary">'
            f"{esc(i.summary)}</span><details><summary>{len(i.consequences)} consequence(s)</summary>"
            f"<ul>{items}{stacks}</ul></details></td></tr>"
        )
        rows.append(f'<tr data-incident="{esc(i.kind)}" data-planned="{str(i.planned).lower()}">{cells}</tr>{story}')
    return f'<h2>{esc(title)} ({len(incidents)})</h2><table id="{table_id}"><tr>{head}</tr>{"".join(rows)}</table>'
