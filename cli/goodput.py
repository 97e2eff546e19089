"""``stalwart goodput report RUN``: the goodput of a run directory as text, JSON or HTML."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from stalwart.cli.command import Subparsers, actions, subcommand
from stalwart.errors import MissingInputError, UserError


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
        when = when.replace(tzinfo=_dt.UTC)
    return when.timestamp()


def register(sub: Subparsers) -> None:
    goodput = sub.add_parser(
        "goodput",
        help="goodput accounting of a run from its event log",
        description="Goodput accounting of a run from its event log.",
    )
    gsub = actions(goodput, "goodput_command")
    report = subcommand(
        gsub,
        "report",
        run=run_report,
        help="where the wall-clock time of a run went",
        description="Productive time, every badput category, and the incidents of a run.",
    )
    report.add_argument("run", metavar="RUN", help="run directory (the one holding events/)")
    report.add_argument("--format", choices=("text", "json", "html"), default="text")
    report.add_argument("--output", "-o", metavar="PATH", help="write here instead of standard output")
    report.add_argument("--since", metavar="TIME", help="window start: epoch seconds or ISO 8601 (UTC if no zone)")
    report.add_argument("--until", metavar="TIME", help="window end: epoch seconds or ISO 8601 (UTC if no zone)")
    report.add_argument("--timeline", action="store_true", help="JSON: include per-segment and per-step timelines")
    sim = subcommand(
        gsub,
        "simulate",
        run=run_simulate,
        help="project goodput at cluster scale (Monte Carlo over a failure mix)",
        description="Project goodput for a cluster size from Llama 3's failure mix and a cost profile: "
        "Monte Carlo with confidence intervals, the best checkpoint interval against "
        "Young/Daly, and what each cost is worth.",
    )
    sim.add_argument(
        "--gpus", type=int, nargs="+", default=[16384, 100000], metavar="N", help="cluster sizes (default 16384 100000)"
    )
    sim.add_argument(
        "--costs",
        nargs="+",
        default=["stalwart"],
        metavar="PROFILE",
        help="stalwart (default), llama3, a TOML file, or 'measured RUN' (stalwart's profile with RUN's measured "
        "costs)",
    )
    sim.add_argument("--days", type=float, default=54.0, help="job length in days (default 54, Llama 3's window)")
    sim.add_argument(
        "--interval", type=float, metavar="S", help="checkpoint interval in seconds (default: the profile's)"
    )
    sim.add_argument("--replicas", type=int, default=1000, help="Monte Carlo jobs per cluster size (default 1000)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--target", type=float, default=97.0, metavar="PCT", help="goodput to reach, percent (default 97)")
    sim.add_argument("--format", choices=("text", "json"), default="text")
    sim.add_argument("--output", "-o", metavar="PATH", help="write here instead of standard output")


def run_report(args: argparse.Namespace, extra: list[str]) -> int:
    """``goodput report``: the run's goodput as text, JSON or HTML."""
    from stalwart.events import read_events
    from stalwart.goodput.accounting import compute_goodput
    from stalwart.goodput.report import format_text, render_html, to_json

    events_dir = Path(args.run) / "events"
    if not events_dir.is_dir():
        raise MissingInputError(
            f"{events_dir} does not exist: RUN must be a run directory (the --job.run_dir of a job)"
        )
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    if since is not None and until is not None and until <= since:
        raise GoodputUsageError(f"--until ({args.until}) must be later than --since ({args.since})")
    damaged: list[str] = []
    events = list(read_events(args.run, damaged))
    if damaged:  # named, never silently used
        print(
            f"stalwart goodput: skipped {len(damaged)} damaged event lines (first: {damaged[0]})",
            file=sys.stderr,
        )
    if not events:
        raise GoodputUsageError(f"no readable events under {events_dir}: did the job start?")
    report = compute_goodput(events, since=since, until=until)
    if args.format == "json":
        text = json.dumps(to_json(report, include_timeline=args.timeline), indent=2) + "\n"
    elif args.format == "html":
        text = render_html(report, events)
    else:
        text = format_text(report)
    _write(text, args.output)
    return 0


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def simulation_costs(spec: list[str]):
    """The cost profile named by ``--costs``: a profile name or file, or ``measured RUN``."""
    from stalwart.goodput.costs import load_profile, measured_profile

    if spec[0] == "measured":
        if len(spec) != 2:
            raise GoodputUsageError("--costs measured needs exactly one run directory: --costs measured RUN")
        return measured_profile(spec[1], load_profile("stalwart"))
    if len(spec) != 1:
        raise GoodputUsageError(f"--costs takes one profile (or 'measured RUN'), got {' '.join(spec)}")
    return load_profile(spec[0])


def run_simulate(args: argparse.Namespace, extra: list[str]) -> int:
    """Run ``goodput simulate`` for every ``--gpus`` value with one seeded Monte Carlo each."""
    import dataclasses

    from stalwart.goodput import simulate as sim

    if (
        any(g < 1 for g in args.gpus)
        or not 0 < args.days <= 3650  # NaN fails this too
        or args.replicas < 2
        or not 0 < args.target < 100
    ):
        raise GoodputUsageError("need --gpus >= 1, 0 < --days <= 3650, --replicas >= 2 and 0 < --target < 100")
    costs = simulation_costs(args.costs)
    if args.interval is not None:
        if not 0 < args.interval < float("inf"):  # NaN fails this too
            raise GoodputUsageError(f"--interval must be a positive number of seconds, got {args.interval}")
        costs = dataclasses.replace(costs, interval_s=args.interval)
    target = args.target / 100.0
    model = sim.LLAMA3_MIX
    results = [sim.simulate(model, costs, g, args.days, args.replicas, args.seed, target) for g in args.gpus]
    if args.format == "json":
        text = (
            json.dumps(sim.to_json(results, model, costs, args.days, args.replicas, args.seed, target), indent=2) + "\n"
        )
    else:
        text = sim.format_text(results, model, costs, args.days, args.replicas, args.seed, target)
    _write(text, args.output)
    return 0


def summarize_run(run_dir: str | Path) -> str:
    """The terminal report of a finished run; the HTML report is written to RUN/goodput.html."""
    from stalwart.events import read_events
    from stalwart.goodput.accounting import compute_goodput
    from stalwart.goodput.report import format_text, render_html

    events = list(read_events(run_dir))
    report = compute_goodput(events)
    html_path = Path(run_dir) / "goodput.html"
    html_path.write_text(render_html(report, events), encoding="utf-8")
    return f"{format_text(report)}\nHTML report: {html_path}\n"
