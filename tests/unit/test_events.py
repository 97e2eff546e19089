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


# ---------------------------------------------------------------- a full disk (a real, small tmpfs)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted for the test (the test set-up needs root, as CI runs)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (CI runs as root); run this test as root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk):
    """Take every free byte of ``disk``; returns the filler to delete."""
    import os

    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:  # ENOSPC: the disk is full
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_retried_counted_and_reported_and_the_writer_lives_on(small_disk):
    log = EventLog(small_disk, role="trainer", rank=0)
    log.emit(EventKind.STEP_END, step=1)
    assert log.flush()
    filler = fill(small_disk)
    for step in range(2, 40):
        log.emit(EventKind.STEP_END, step=step, padding="x" * 200)
    assert not log.flush()  # ENOSPC: kept, not raised
    assert log.write_failures >= 1 and log.dropped == 0
    time.sleep(2.5)  # the background writer keeps trying and must survive doing so
    assert log._flusher.is_alive()
    filler.unlink()
    log.emit(EventKind.STEP_END, step=40)
    assert log.flush()
    log.close()
    events = list(read_events(small_disk))
    assert [e["step"] for e in events if e["kind"] == "step_end"] == list(range(1, 41))  # none lost, none torn
    trouble = [e for e in events if e["kind"] == "events_dropped"]
    assert trouble and trouble[-1]["dropped"] == 0 and trouble[-1]["write_failures"] >= 1


def test_events_beyond_the_bound_are_dropped_whole_and_counted_in_the_goodput_report(small_disk):
    from stalwart.goodput import compute_goodput
    from stalwart.goodput.report import format_text

    log = EventLog(small_disk, role="trainer", rank=0, max_unwritten_bytes=2000)
    log.emit(EventKind.JOB_START, steps=100)
    log.emit(EventKind.INIT_DONE, seconds=0.1)
    assert log.flush()
    filler = fill(small_disk)
    for step in range(1, 101):
        log.emit(EventKind.STEP_BEGIN, step=step)
        log.emit(EventKind.STEP_END, step=step, step_seconds=0.01, tokens=10, loss=1.0)
        log.flush()
    assert log.dropped > 0
    dropped = log.dropped
    filler.unlink()
    assert log.flush()
    log.close()
    events = list(read_events(small_disk))
    with open(log.path, "rb") as f:
        lines = f.read().splitlines()
    assert all(json.loads(line) for line in lines)  # whole lines only: nothing torn by a drop
    steps = [e["step"] for e in events if e["kind"] == "step_end"]
    assert steps == sorted(steps) and steps[-1] == 100 and len(steps) < 100  # the newest kept, the oldest dropped
    report = compute_goodput(events)
    assert report.events_dropped == dropped and report.event_write_failures >= 1
    assert f"{dropped} events dropped" in format_text(report)


def test_flush_soon_from_a_signal_handler_never_deadlocks(tmp_path):
    import signal

    log = EventLog(tmp_path, role="trainer", rank=0)
    previous = signal.signal(signal.SIGUSR2, lambda *_: log.flush_soon())
    try:
        with log._lock:  # the main thread is inside emit() when the signal lands
            signal.raise_signal(signal.SIGUSR2)
        log.emit(EventKind.STEP_END, step=1)
        log.flush_soon()
        assert any(e["kind"] == "step_end" for e in read_events(tmp_path))
    finally:
        signal.signal(signal.SIGUSR2, previous)
        log.close()
