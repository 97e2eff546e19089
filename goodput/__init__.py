"""Goodput accounting: productive time versus every kind of badput, from a job's event log."""

from stalwart.goodput.accounting import (
    CATEGORIES,
    PRODUCTIVE,
    GoodputReport,
    Incident,
    Segment,
    StepRecord,
    compute_goodput,
    estimate_clock_offsets,
    rolling_goodput,
    step_rate,
)
from stalwart.goodput.incidents import Consequence
from stalwart.goodput.report import format_text, incident_dict, render_html, to_json

__all__ = [
    "CATEGORIES",
    "Consequence",
    "PRODUCTIVE",
    "GoodputReport",
    "Incident",
    "Segment",
    "StepRecord",
    "compute_goodput",
    "estimate_clock_offsets",
    "format_text",
    "incident_dict",
    "render_html",
    "rolling_goodput",
    "step_rate",
    "to_json",
]
