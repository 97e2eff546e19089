"""Hand-built event logs for the goodput tests: a job whose every second is accounted for by hand."""

from __future__ import annotations

T0 = 1_800_000_000.0  # an arbitrary epoch; every time below is T0 + seconds


def ev(t, kind, host="a", rank=0, attempt=0, pid=None, role="trainer", **fields):
    pid = pid if pid is not None else (100 + rank + 10 * attempt if role == "trainer" else 1)
    return {
        "v": 1,
        "ts": T0 + t,
        "kind": kind,
        "role": role,
        "host": host,
        "node": None,
        "pid": pid,
        "rank": rank if role == "trainer" else None,
        "attempt": attempt,
        **fields,
    }


def steps(first, last, t_start, host, rank, attempt, step_s=2.0, data_s=0.25):
    out, t = [], t_start
    for s in range(first, last + 1):
        out.append(ev(t, "step_begin", host, rank, attempt, step=s))
        out.append(
            ev(
                t + step_s,
                "step_end",
                host,
                rank,
                attempt,
                step=s,
                step_seconds=step_s,
                data_seconds=data_s,
                loss=10.0 / s,
                tokens=4096,
            )
        )
        t += step_s
    return out


def hand_log():
    """Two ranks (rank 0 on host a; rank 1 on host b, then on spare host c after the fault).

    0..10     start-up (rank 0 from its first event to init_done; rank 1 inside it)
    10..30    steps 1-10, 2 s each (0.25 s of each waiting on data)
    30..31    checkpoint of step 10, 1 s blocking (its async commit at 35 blocks 0 s)
    31..51    steps 11-20 — recomputed after the fault: lost
    51        step 21 begins; rank 1 dies; its last heartbeat (last progress) at 52
    51..52    the partial step 21: lost
    52..54    detection latency (fault detected at 54)
    55..58    waiting for a hot spare (node excluded at 55, joined at 58)
    54..55, 58..60  restart downtime (the rest of the gap until the workers start at 60)
    60..64    start-up of attempt 1;  64..67 checkpoint load of step 10 (3 s)
    67..97    steps 11-25 again, kept;  97..100 nothing explains it: other; job end at 100
    """
    log = [
        ev(0, "clock", mono=1.0),
        ev(0.0, "job_start", steps=25),
        ev(1, "worker_start", world_size=2),
        ev(0.5, "clock", "b", 1, mono=7.0),
        ev(1, "worker_start", "b", 1, world_size=2),
        ev(10, "init_done", seconds=10.0),
        ev(9.5, "init_done", "b", 1, seconds=9.0),
    ]
    for host, rank in (("a", 0), ("b", 1)):
        log += steps(1, 10, 10.0, host, rank, 0)
        log.append(ev(31, "ckpt_stage", host, rank, step=10, blocking_seconds=1.0, seconds=1.0, bytes=10))
        log.append(ev(35, "ckpt_commit", host, rank, step=10, blocking_seconds=0.0, seconds=5.0, bytes=10))
        log += steps(11, 20, 31.0, host, rank, 0)
        log.append(ev(51, "step_begin", host, rank, step=21))
    log.append(ev(56, "worker_stop", reason="failed"))  # rank 0, killed while hung in the collective
    log.append(
        ev(
            54,
            "fault_detected",
            role="agent",
            fault="process_exit",
            target=1,
            detector="agent",
            last_progress_ts=T0 + 52,
        )
    )
    log += [
        ev(55, "node_excluded", role="controller", node=1, reason="process_exit"),
        ev(58, "node_joined", role="controller", node=2),
    ]
    for host, rank in (("a", 0), ("c", 1)):
        log += [
            ev(60, "clock", host, rank, 1, mono=100.0),
            ev(60.5, "worker_start", host, rank, 1, world_size=2),
            ev(64, "init_done", host, rank, 1, seconds=4.0),
            ev(67, "ckpt_load", host, rank, 1, step=10, seconds=3.0, bytes=10),
        ]
        log += steps(11, 25, 67.0, host, rank, 1)
    log += [ev(98, "worker_stop", attempt=1, reason="ok"), ev(100, "job_end", attempt=1, status="ok", steps=25)]
    return log


EXPECTED = {
    "startup": 10.0 + 4.0,
    "checkpoint_save": 1.0,
    "checkpoint_load": 3.0,
    "lost_progress": 20.0 + 1.0,
    "detection_latency": 2.0,
    "restart_downtime": 1.0 + 2.0,
    "data_stall": 25 * 0.25,
    "hot_spare_wait": 3.0,
    "other": 3.0,
}
EXPECTED_PRODUCTIVE = 25 * (2.0 - 0.25)  # 43.75
