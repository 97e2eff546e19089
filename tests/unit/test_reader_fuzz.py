"""Generated corruption of manifests, commit markers and event logs: no exception escapes a reader, and the damage
is named.

A small checkpoint root is written by hand in the layout the manager writes (shards, ``manifest.json`` with real
checksums, ``COMMITTED`` last): step 1 intact, step 2 damaged by hypothesis (truncated, bytes flipped, replaced by
arbitrary JSON, a field set to any JSON value, deep nesting, deleted, duplicated). The readers are the catalog every
consumer uses (trainer loader, ``stalwart ckpt``, controller) and ``stalwart ckpt ls/verify`` themselves; event
logs go through ``read_events`` and ``stalwart goodput report``. Torch-free, in-process, bounded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.checkpoint.manifest import MANIFEST_NAME, CheckpointManifest, FileEntry, checksum_stream
from stalwart.cli.main import main
from stalwart.events import event_damage, read_events
from stalwart.jobenv import PARENT_PID_ENV

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
# Values that once escaped a reader or would (times past datetime's range, NaN, bools where numbers go).
NASTY = st.sampled_from([1e300, -1e300, -1, 0, float("nan"), float("inf"), True, False, "", [], {}, 2**70])
PAYLOAD = st.one_of(NASTY, JSON)
FIELDS = ["step", "world_size", "files", "checksum", "layout", "model", "verified", "rolled_back", "created", "x"]


def _write_step(root: Path, step: int, name: str | None = None) -> Path:
    """A committed step as the manager leaves it: one shard, .metadata, manifest, marker."""
    d = root / (name or naming.final_name(step))
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * (step + 1))
    (d / ".metadata").write_bytes(b"metadata-" + str(step).encode())
    files = {}
    for rel in ("__0_0.distcp", ".metadata"):
        with open(d / rel, "rb") as f:
            files[rel] = FileEntry(size=(d / rel).stat().st_size, checksum=checksum_stream(f))
    manifest = CheckpointManifest(step=step, world_size=1, files=files, model={"num_hidden_layers": 4})
    (d / MANIFEST_NAME).write_text(manifest.to_json())
    marker = {"step": step, "dir": d.name, "committed_at": time.time() + step, "epoch": None}
    (d / naming.COMMIT_MARKER).write_text(json.dumps(marker))
    return d


def _corrupt(data: bytes, how: str, position: int, payload: object, field: str) -> bytes | None:
    """One kind of damage to a file's bytes; None deletes the file."""
    cut = position % (len(data) + 1)
    if how == "truncate":
        return data[:cut]
    if how == "flip":
        if not data:
            return b"\xff"
        i = position % len(data)
        return data[:i] + bytes([data[i] ^ 0xA5]) + data[i + 1 :]
    if how == "replace":
        return json.dumps(payload).encode()
    if how == "field":
        try:
            raw = json.loads(data)
            raw[field] = payload
            return json.dumps(raw).encode()
        except (ValueError, TypeError, RecursionError):  # not an object (any more): nothing to set
            return data
    if how == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    if how == "binary":
        return bytes([position % 256]) * 64
    return None  # delete


DAMAGE = st.tuples(
    st.sampled_from([MANIFEST_NAME, naming.COMMIT_MARKER, "__0_0.distcp", ".metadata"]),
    st.sampled_from(["truncate", "flip", "replace", "field", "deep", "binary", "delete"]),
    st.integers(min_value=0, max_value=10_000),
    PAYLOAD,
    st.sampled_from(FIELDS),
)


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return rc, out.out + out.err


def _damaged_root(damages: list, duplicate: bool) -> Path:
    """Step 1 intact, step 2 with ``damages`` applied (and, with ``duplicate``, an older intact copy of step 2)."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
    _write_step(root, 1)
    damaged_dir = _write_step(root, 2)
    if duplicate:
        _write_step(root, 2, naming.tmp_name(2, "older0000000"))
        marker = root / naming.tmp_name(2, "older0000000") / naming.COMMIT_MARKER
        marker.write_text(json.dumps({"step": 2, "dir": marker.parent.name, "committed_at": 1.0, "epoch": None}))
    for file, how, position, payload, field in damages:
        path = damaged_dir / file
        if not path.exists():
            continue
        data = _corrupt(path.read_bytes(), how, position, payload, field)
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
    return root


def _check_readers(root: Path, duplicate: bool, capsys: pytest.CaptureFixture) -> None:
    """Every reader answers; step 2's damage is named and fallen back past; step 1 stays intact."""
    catalog = CheckpointCatalog.open(str(root))
    committed = catalog.committed_steps()
    assert 1 in committed
    heard: list[tuple[int, str]] = []
    choice = catalog.choose("latest", on_damage=lambda step, why: heard.append((step, why)))
    assert choice.step in (1, 2)
    if 2 in committed:
        problems = catalog.verify(2)
        assert all(isinstance(p, str) and p for p in problems)  # each problem a named line
        try:
            rolled_back = catalog.manifest(2).rolled_back
        except Exception:
            rolled_back = False
        if problems or rolled_back:
            if not duplicate:
                assert choice.step == 1, (problems, choice)
            if problems and not rolled_back and choice.step == 1:
                assert any(step == 2 for step, _ in heard), (problems, heard)  # the fallback says why
        else:
            assert choice.step == 2
    assert catalog.verify(1) == []
    catalog.verified_steps()
    catalog.latest(verified_only=True)
    catalog.prune(keep_last=5)

    rc, text = _run_cli(["ckpt", "ls", str(root)], capsys)
    assert rc == 0 and "1" in text
    rc, text = _run_cli(["ckpt", "verify", str(root)], capsys)
    assert rc in (0, 1)
    if rc == 1:
        assert "step 2:" in text  # the damaged step is named


@settings(
    max_examples=50,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(damages=st.lists(DAMAGE, min_size=1, max_size=3), duplicate=st.booleans())
def test_damaged_checkpoint_metadata_is_named_and_skipped_never_raised(
    damages: list, duplicate: bool, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    root = _damaged_root(damages, duplicate)
    try:
        _check_readers(root, duplicate, capsys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


NASTY_VALUES = [1e300, -1, float("nan"), float("inf"), True, "", [], 2**70]


@pytest.mark.parametrize("file", [MANIFEST_NAME, naming.COMMIT_MARKER])
def test_every_field_set_to_every_nasty_value_is_named_not_raised(
    file: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The systematic part of the fuzz: each field of a manifest or marker, each value that breaks arithmetic."""
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    fields = FIELDS if file == MANIFEST_NAME else ["step", "dir", "committed_at", "epoch", "x"]
    for field in fields:
        for value in NASTY_VALUES:
            root = _damaged_root([(file, "field", 0, value, field)], duplicate=False)
            try:
                _check_readers(root, False, capsys)
            finally:
                shutil.rmtree(root, ignore_errors=True)


def _valid_events(n_steps: int) -> list[dict]:
    t0 = 1_700_000_000.0
    common = {"v": 1, "role": "trainer", "host": "h", "node": 0, "pid": 7, "rank": 0, "attempt": 0}
    events = [{**common, "ts": t0, "kind": "job_start", "steps": n_steps}]
    for s in range(1, n_steps + 1):
        events.append({**common, "ts": t0 + s, "kind": "step_begin", "step": s})
        events.append({**common, "ts": t0 + s + 0.9, "kind": "step_end", "step": s, "step_seconds": 0.9, "tokens": 128})
    events.append({**common, "ts": t0 + n_steps + 1, "kind": "job_end", "status": "ok", "steps": n_steps})
    return events


EVENT_DAMAGE = st.one_of(
    st.binary(max_size=40).map(lambda b: ("bytes", b)),
    JSON.map(lambda v: ("json", v)),
    st.tuples(st.sampled_from(["ts", "kind", "step", "step_seconds", "tokens", "status", "v", "pid"]), PAYLOAD).map(
        lambda kv: ("field", kv)
    ),
    st.sampled_from([1e300, -1.0, float("nan"), "2026-12-01", True]).map(lambda ts: ("field", ("ts", ts))),
)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.integers(min_value=0, max_value=30), EVENT_DAMAGE), min_size=1, max_size=4))
def test_damaged_event_lines_are_named_and_never_used(
    damage: list, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    run = Path(tempfile.mkdtemp(prefix="fuzz-events-"))
    try:
        lines = [json.dumps(e) for e in _valid_events(6)]
        for position, (how, value) in damage:
            i = position % len(lines)
            if how == "bytes":
                lines.insert(i, value.decode("latin-1").replace("\n", " ").replace("\r", " "))
            elif how == "json":
                lines.insert(i, json.dumps(value))
            else:
                key, new = value
                record = _object_or_none(lines[i])
                if record is not None:
                    record[key] = new
                    lines[i] = json.dumps(record)
        (run / "events").mkdir()
        (run / "events" / "trainer-r0-h-7.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

        damaged: list[str] = []
        events = list(read_events(run, damaged))
        assert all(event_damage(e) is None for e in events)  # nothing mistyped is ever used
        bad_lines = sum(1 for line in lines if line.strip() and _line_damage(line) is not None)
        assert len(damaged) == bad_lines, (damaged, lines)
        assert all(" line " in d and ": " in d for d in damaged)  # file and line named, then why

        rc, text = _run_cli(["goodput", "report", str(run)], capsys)
        assert rc in (0, 2)
        if damaged and rc == 0:
            assert f"skipped {len(damaged)} damaged event lines" in text
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _line_damage(line: str) -> str | None:
    try:
        return event_damage(json.loads(line))
    except (ValueError, RecursionError):
        return "not JSON"


def _object_or_none(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None
