"""Goodput accounting against a hand-computed job, skewed clocks, torn logs, windows, renderings."""

import json
import random

import pytest
from goodput_logs import EXPECTED, EXPECTED_PRODUCTIVE, T0, ev, hand_log, steps

from stalwart.cli.goodput import parse_time
from stalwart.cli.main import main as stalwart_main
from stalwart.events import read_events
from stalwart.goodput import CATEGORIES, compute_goodput, format_text, render_html, to_json


def check_hand_answer(report, tol):
    assert report.wall_seconds == pytest.approx(100.0, abs=tol)
    assert report.productive_seconds == pytest.approx(EXPECTED_PRODUCTIVE, abs=tol)
    assert report.goodput == pytest.approx(0.4375, abs=tol)
    for name, seconds in EXPECTED.items():
        assert report.badput[name] == pytest.approx(seconds, abs=tol), name
    assert set(report.badput) == set(CATEGORIES)
    assert report.productive_seconds + sum(report.badput.values()) == pytest.approx(report.wall_seconds, abs=tol)
    assert (report.steps_kept, report.steps_lost, report.last_step, report.incarnations) == (25, 10, 25, 2)
    [inc] = report.incidents
    assert (inc.kind, inc.planned, inc.target, inc.ranks, inc.detector) == ("rank_died", False, "rank 1", [1], "agent")
    assert inc.detection_latency == pytest.approx(2.0, abs=tol)  # 54 - 52
    assert inc.downtime == pytest.approx(13.0, abs=tol)  # detected at 54, stepping again at 67
    assert inc.lost_steps == 10 and inc.restored_step == 10
    assert inc.lost_seconds == pytest.approx(21.0, abs=tol)
    # The exclusion and the spare that took the node's place follow from the fault: consequences, not incidents.
    assert inc.actions == ["exclusion", "replacement", "restart", "reload"]
    assert [c.text for c in inc.consequences if c.action == "replacement"] == ["node2 joined, replacing node1"]


def test_hand_computed_answer_is_exact():
    check_hand_answer(compute_goodput(hand_log()), 1e-9)


def test_input_order_does_not_matter():
    log = hand_log()
    random.Random(0).shuffle(log)
    check_hand_answer(compute_goodput(log), 1e-9)


@pytest.mark.parametrize("host, shift", [("b", 30.0), ("c", -12.5)])
def test_clock_skew_of_one_host_is_corrected(host, shift):
    log = [dict(e, ts=e["ts"] + shift) if e["host"] == host else e for e in hand_log()]
    report = compute_goodput(log)
    assert report.clock_offsets[host] == pytest.approx(-shift, abs=1e-6)
    check_hand_answer(report, 1e-6)


def test_skew_estimate_is_robust_to_jitter():
    """Ranks finish a synchronous step within milliseconds: the median over steps absorbs that."""
    rng = random.Random(1)
    log = [
        dict(e, ts=e["ts"] + 30.0 + (rng.uniform(-0.002, 0.002) if e["kind"] == "step_end" else 0.0))
        if e["host"] == "b"
        else e
        for e in hand_log()
    ]
    assert compute_goodput(log).clock_offsets["b"] == pytest.approx(-30.0, abs=0.002)


def test_unskewed_log_needs_no_offsets():
    assert all(o == 0.0 for o in compute_goodput(hand_log()).clock_offsets.values())


def test_missing_job_end_and_dead_process():
    """A job whose last incarnation died: wall ends at its last event, the partial step is lost."""
    log = [e for e in hand_log() if e["kind"] not in ("job_end", "worker_stop") or e["attempt"] == 0]
    log = [e for e in log if not (e["attempt"] == 1 and e["kind"] == "step_end" and e["step"] == 25)]
    report = compute_goodput(log)
    # Step 25 began at 95 and never finished; rank 0's last event is that step_begin (ts 95).
    assert report.wall_seconds == pytest.approx(95.0, abs=1e-9)
    assert report.steps_kept == 24
    assert report.badput["lost_progress"] == pytest.approx(21.0, abs=1e-9)  # the open step has length 0 here
    assert report.productive_seconds + sum(report.badput.values()) == pytest.approx(95.0, abs=1e-9)


def test_unexplained_restart_and_rollback():
    """A restart no detector reported, then a rollback: both become incidents with their losses."""
    log = [ev(0, "clock", mono=0.0), ev(0, "init_done", seconds=0.0)] + steps(1, 5, 0.0, "a", 0, 0, data_s=0.0)
    log.append(ev(10, "step_begin", step=6))
    # attempt 1 starts at 20 (nobody said why), resumes from step 3 without a ckpt_load event
    log += [ev(20, "clock", attempt=1, mono=0.0), ev(22, "init_done", attempt=1, seconds=2.0)]
    log += steps(4, 8, 22.0, "a", 0, 1, data_s=0.0)  # 22..32
    log.append(ev(33, "rollback", role="controller", from_step=8, to_step=6, reason="loss_spike"))
    log += steps(7, 8, 33.0, "a", 0, 1, data_s=0.0)  # 33..37
    report = compute_goodput(log)
    assert report.wall_seconds == pytest.approx(37.0)
    # lost: steps 4,5 of attempt 0 (4 s), steps 7,8 first time (4 s); open step 6 at 10 has length 0
    assert report.badput["lost_progress"] == pytest.approx(8.0)
    assert report.badput["restart_downtime"] == pytest.approx(10.0)  # last progress 10 .. restart 20
    assert report.badput["startup"] == pytest.approx(2.0)
    assert report.productive_seconds == pytest.approx(3 * 2.0 + 3 * 2.0 + 2 * 2.0)  # steps 1-3, 4-6, 7-8
    assert report.badput["other"] == pytest.approx(1.0)  # 32..33
    kinds = [(i.kind, i.lost_steps, i.restored_step) for i in report.incidents]
    assert kinds == [("unexplained_restart", 2, 3), ("rollback", 2, 6)]
    assert report.incidents[0].detection_latency is None
    assert report.incidents[0].downtime == pytest.approx(12.0)  # last event 10 .. stepping again at 22


def test_hang_seen_from_two_nodes_is_one_incident_named_after_the_stopped_rank():
    """Rank 2 on host b is SIGSTOPped: b names it (and its node mate 3 blocked); a sees 0 and 1 stall, no culprit."""

    def hang(t, host, rank, fault, found_here):
        return ev(
            t,
            "fault_detected",
            host,
            role="healthd",
            fault=fault,
            target=f"rank{rank}",
            detector="healthd",
            last_progress_ts=T0 + 10,
            detail={"culprit_found_here": found_here},
        )

    base = [ev(0, "clock", mono=0.0), ev(0, "init_done", seconds=0.0)] + steps(1, 5, 0.0, "a", 0, 0, data_s=0.0)
    log = base + [
        hang(14, "a", 0, "hang", False),
        hang(14, "a", 1, "hang", False),
        hang(15, "b", 2, "hang", True),
        hang(15, "b", 3, "hang_blocked", True),
    ]
    [inc] = compute_goodput(log).incidents
    assert (inc.kind, inc.target, inc.suspects, inc.ts) == ("hang", "rank 2", False, T0 + 15)
    blocked = sorted(c.text.split(" blocked")[0] for c in inc.consequences if c.action == "blocked")
    assert blocked == ["rank 0", "rank 1", "rank 3"]
    # One node alone, no culprit (a wedged thread, not a stopped process): its ranks are the suspects.
    alone = base + [hang(14, "a", 0, "hang", False), hang(14, "a", 1, "hang", False)]
    [inc] = compute_goodput(alone).incidents
    assert (inc.kind, inc.target, inc.suspects) == ("hang", "suspects: ranks 0, 1", True)
    assert "no stopped process was found (suspects)" in inc.summary
    # After the job stepped again, a culprit is another incident: it does not relabel the first.
    later = alone + steps(6, 8, 30.0, "a", 0, 0, data_s=0.0) + [hang(40, "b", 2, "hang", True)]
    assert [(i.kind, i.target) for i in compute_goodput(later).incidents] == [
        ("hang", "suspects: ranks 0, 1"),
        ("hang", "rank 2"),
    ]


def test_ranks_of_one_group_on_agents_with_different_restart_counts_are_one_incarnation():
    """Host a's agent restarted twice before host c's replacement node joined: one group, attempts 2 and 0."""
    log = [ev(0, "clock", mono=0.0), ev(0, "init_done", seconds=0.0)] + steps(1, 5, 0.0, "a", 0, 0, data_s=0.0)
    log += steps(1, 5, 0.0, "b", 1, 0, data_s=0.0)
    log.append(
        ev(
            11,
            "fault_detected",
            role="agent",
            fault="rank_exit",
            target="rank1",
            detector="agent",
            last_progress_ts=T0 + 10,
        )
    )
    log += [
        ev(20, "init_done", "a", 0, attempt=2, seconds=0.0),
        ev(20, "init_done", "c", 1, attempt=0, pid=300, seconds=0.0),
    ]
    log += steps(6, 10, 20.0, "a", 0, 2, data_s=0.0) + steps(6, 10, 20.0, "c", 1, 0, data_s=0.0)
    for e in log:
        if e["host"] == "c":
            e["pid"] = 300
    report = compute_goodput(log)
    assert report.incarnations == 2
    assert [(i.kind, i.target) for i in report.incidents] == [("rank_died", "rank 1")]
    assert report.steps_kept == 10 and report.steps_lost == 0


def test_since_until_window():
    report = compute_goodput(hand_log(), since=T0 + 20.0, until=T0 + 70.0)
    assert report.wall_seconds == pytest.approx(50.0, abs=1e-9)
    # 20..30 steps 6-10 kept (5 x 1.75 productive, 5 x 0.25 data); 67..70 step 11 + half of 12
    assert report.productive_seconds == pytest.approx(5 * 1.75 + 1.75 + 0.75, abs=1e-9)
    assert report.badput["data_stall"] == pytest.approx(5 * 0.25 + 2 * 0.25, abs=1e-9)
    assert report.badput["checkpoint_load"] == pytest.approx(3.0, abs=1e-9)
    assert report.badput["startup"] == pytest.approx(4.0, abs=1e-9)
    assert report.productive_seconds + sum(report.badput.values()) == pytest.approx(50.0, abs=1e-9)
    assert len(report.incidents) == 1
    assert compute_goodput(hand_log(), since=T0 + 60.0).incidents == []


def test_empty_log_is_an_error():
    with pytest.raises(ValueError, match="no events"):
        compute_goodput([])


def write_run(tmp_path, log):
    (tmp_path / "events").mkdir()
    by_proc = {}
    for e in log:
        by_proc.setdefault((e["role"], e["host"], e["pid"]), []).append(e)
    for (role, host, pid), evs in by_proc.items():
        lines = [json.dumps(e) for e in evs]
        (tmp_path / "events" / f"{role}-{host}-{pid}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_torn_lines_in_a_run_dir(tmp_path):
    run = write_run(tmp_path, hand_log())
    with open(run / "events" / "trainer-b-101.jsonl", "a") as f:
        f.write('{"v": 1, "ts": 1800000052.0, "kind": "step_e')  # rank 1 died mid-write
    check_hand_answer(compute_goodput(read_events(run)), 1e-9)


def test_renderings(tmp_path):
    report = compute_goodput(hand_log())
    text = format_text(report)
    assert "goodput     43.75 %" in text and "rank_died" in text and "lost_progress" in text
    assert "incidents   1 fault(s), 0 planned" in text and report.incidents[0].summary in text
    data = json.loads(json.dumps(to_json(report)))
    assert data["goodput"] == report.goodput and data["wall_seconds"] == report.wall_seconds
    assert data["badput"] == report.badput and data["productive_seconds"] == report.productive_seconds
    assert data["incidents"][0]["lost_seconds"] == report.incidents[0].lost_seconds
    assert data["incidents"][0]["summary"] == report.incidents[0].summary
    assert data["incidents"][0]["consequences"][0]["text"] == report.incidents[0].consequences[0].text
    page = render_html(report, hand_log())
    assert page.startswith("<!DOCTYPE html>") and "43.75 %" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 3  # timeline, step time and loss, rolling goodput


def test_cli_formats_and_errors(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    run = write_run(tmp_path / "run", hand_log())
    assert stalwart_main(["goodput", "report", str(run), "--format", "json", "--output", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["goodput"] == pytest.approx(0.4375)
    assert stalwart_main(["goodput", "report", str(run), "--format", "html", "-o", str(tmp_path / "g.html")]) == 0
    assert "data:image/png;base64," in (tmp_path / "g.html").read_text()
    assert (
        stalwart_main(["goodput", "report", str(run), "--since", str(T0 + 60), "--until", "2027-01-15T08:01:40Z"]) == 0
    )
    assert "wall time   40.00 s" in capsys.readouterr().out
    assert stalwart_main(["goodput", "report", str(tmp_path / "nope")]) == 2
    assert stalwart_main(["goodput", "report", str(run), "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert "run directory" in err and "ISO 8601" in err


def test_parse_time():
    assert parse_time("1795426595.5") == 1795426595.5
    assert (
        parse_time("2026-11-23T09:30:00Z")
        == parse_time("2026-11-23T09:30:00")
        == parse_time("2026-11-23T10:30:00+01:00")
    )
