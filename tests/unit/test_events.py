"""The event log: common schema, buffered flushing, and readers that survive torn lines."""

import json
import time

import pytest

from stalwart.events import EventKind, EventLog, read_events


def test_emit_flush_and_read(tmp_path):
    log = EventLog(tmp_path, role="trainer", rank=3)
    log.emit(EventKind.STEP_END, step=1, tokens=128, loss=5.5)
    log.close()
    events = list(read_events(tmp_path))
    kinds = [e["kind"] for e in events]
    assert kinds == ["clock", "step_end"]
    step = events[1]
    assert step["rank"] == 3 and step["role"] == "trainer" and step["step"] == 1 and step["v"] == 1
    assert {"ts", "host", "pid", "attempt", "node"} <= step.keys()


def test_background_flush_within_a_second_or_two(tmp_path):
    log = EventLog(tmp_path, role="agent")
    log.emit(EventKind.WORKER_START, world_size=4)
    deadline = time.time() + 5
    while time.time() < deadline and not any(e["kind"] == "worker_start" for e in read_events(tmp_path)):
        time.sleep(0.1)
    assert any(e["kind"] == "worker_start" for e in read_events(tmp_path)), "not flushed by the background thread"
    log.close()


def test_reserved_keys_and_unknown_kinds_rejected(tmp_path):
    log = EventLog(tmp_path, role="cli")
    with pytest.raises(ValueError, match="reserved"):
        log.emit(EventKind.STEP_END, rank=1)
    with pytest.raises(ValueError):
        log.emit("not_a_kind")
    log.close()


def test_torn_and_foreign_lines_are_skipped(tmp_path):
    log = EventLog(tmp_path, role="trainer", rank=0)
    log.emit(EventKind.STEP_END, step=7)
    log.close()
    with open(log.path, "a") as f:
        f.write('[1, 2]\n{"no_kind": 1}\n{"kind": "step_end", "ts": 1.0, "st')  # a process died mid-line
    events = list(read_events(tmp_path))
    assert [e.get("step") for e in events if e["kind"] == "step_end"] == [7]
    assert all(isinstance(e, dict) for e in events)
    json.dumps(events)
