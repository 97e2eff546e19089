"""``stalwart goodput report RUN``: the goodput of a run directory as text, JSON or HTML."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from stalwart.runtime.cli import UserError


class GoodputUsageError(UserError, ValueError):
    """Input the user can fix (bad time, no events); ``stalwart`` prints it as one line, exit 2."""


def parse_time(text: str) -> float:
    """Seconds since the epoch, or ISO 8601 (a time without a zone is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise GoodputUsageError(
            f"cannot read time {text!r}: give seconds since the epoch (1795426595.5) or ISO 8601 (2026-11-23T09:30:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def add_goodput_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount ``goodput report`` on a ``stalwart`` subparsers object; sets ``func=cmd_goodput``."""
    goodput = sub.add_parser("goodput", help="goodput accounting of a run from its event log",
                             description="Goodput accounting of a run from its event log.")
    gsub = goodput.add_subparsers(dest="goodput_command", metavar="ACTION", required=True)
    report = gsub.add_parser("report", help="where the wall-clock time of a run went",
                             description="Productive time, every badput category, and the incidents of a run.")
    report.add_argument("run", metavar="RUN", help="run directory (the one holding events/)")
    report.add_argument("--format", choices=("text", "json", "html"), default="text")
    report.add_argument("--output", "-o", metavar="PATH", help="write here instead of standard output")
    report.add_argument("--since", metavar="TIME", help="window start: epoch seconds or ISO 8601 (UTC if no zone)")
    report.add_argument("--until", metavar="TIME", help="window end: epoch seconds or ISO 8601 (UTC if no zone)")
    report.add_argument("--timeline", action="store_true", help="JSON: include per-segment and per-step timelines")
    goodput.set_defaults(func=cmd_goodput)
    return goodput


def cmd_goodput(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """Run ``goodput report``; raises :class:`GoodputUsageError` / FileNotFoundError for user errors."""
    from stalwart.runtime.events import read_events
    from stalwart.runtime.goodput.accounting import compute_goodput
    from stalwart.runtime.goodput.report import format_text, render_html, to_json

    if overrides:
        raise GoodputUsageError(f"unexpected arguments {' '.join(overrides)}; see stalwart goodput report --help")
    events_dir = Path(args.run) / "events"
    if not events_dir.is_dir():
        raise FileNotFoundError(f"{events_dir} does not exist: RUN must be a run directory (the --job.run_dir of a job)")
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    if since is not None and until is not None and until <= since:
        raise GoodputUsageError(f"--until ({args.until}) must be later than --since ({args.since})")
    events = list(read_events(args.run))
    if not events:
        raise GoodputUsageError(f"no readable events under {events_dir}: did the job start?")
    report = compute_goodput(events, since=since, until=until)
    if args.format == "json":
        text = json.dumps(to_json(report, include_timeline=args.timeline), indent=2) + "\n"
    elif args.format == "html":
        text = render_html(report, events)
    else:
        text = format_text(report)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def summarize_run(run_dir: str | Path) -> str:
    """The terminal report of a finished run; the HTML report is written to RUN/goodput.html."""
    from stalwart.runtime.events import read_events
    from stalwart.runtime.goodput.accounting import compute_goodput
    from stalwart.runtime.goodput.report import format_text, render_html

    events = list(read_events(run_dir))
    report = compute_goodput(events)
    html_path = Path(run_dir) / "goodput.html"
    html_path.write_text(render_html(report, events), encoding="utf-8")
    return f"{format_text(report)}\nHTML report: {html_path}\n"


def goodput_main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``goodput_main(["report", RUN, "--format", "json"])``."""
    parser = argparse.ArgumentParser(prog="stalwart")
    add_goodput_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["goodput", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_goodput(args)
    except (GoodputUsageError, FileNotFoundError) as e:
        print(f"stalwart goodput: error: {e}", file=sys.stderr)
        return 2
