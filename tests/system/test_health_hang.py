"""HangDetector with a fake clock: warm-up limits, adaptive limit, floor, phases, one report per hang."""

import pytest

from stalwart.health.hang import Hang, HangConfig, HangDetector, Phase

CFG = HangConfig(
    warmup_steps=3,
    safety_factor=5.0,
    floor_s=2.0,
    initial_limits={Phase.INIT: 300, Phase.STEP: 60, Phase.CHECKPOINT: 600, Phase.EVAL: 100},
)


def beats(det: HangDetector, rank: int, phase: Phase, times: list[float]) -> None:
    for t in times:
        assert det.observe(rank, phase, t)


def test_warmup_uses_initial_limit():
    det = HangDetector(CFG)
    beats(det, 0, Phase.STEP, [0.0, 30.0])  # 2 beats < warmup 3: the first step may take long (compile)
    assert det.limit(0) == 60
    assert det.check(89.9) == []
    (hang,) = det.check(90.1)
    assert hang == Hang(0, Phase.STEP, 30.0, 60.0, pytest.approx(60.1))


def test_adaptive_limit_ignores_first_interval_and_tracks_longest():
    det = HangDetector(CFG)
    beats(det, 0, Phase.STEP, [0.0, 40.0, 41.0, 42.0])  # first interval (40 s compile) is left out
    assert det.limit(0) == 5.0
    beats(det, 0, Phase.STEP, [43.5])  # a longer step raises the limit: 5 x 1.5
    assert det.limit(0) == 7.5
    assert det.check(43.5 + 7.4) == []
    assert [h.rank for h in det.check(43.5 + 7.6)] == [0]


def test_floor():
    det = HangDetector(CFG)
    beats(det, 0, Phase.STEP, [0.0, 0.1, 0.2, 0.3])
    assert det.limit(0) == 2.0  # 5 x 0.1 s would flag ordinary jitter
    assert det.check(2.2) == []
    assert len(det.check(2.4)) == 1


def test_phases_have_their_own_limits_and_reports_are_once_per_hang():
    det = HangDetector(CFG)
    beats(det, 1, Phase.STEP, [0.0, 1.0, 2.0, 3.0])
    assert det.limit(1) == 5.0
    beats(det, 1, Phase.CHECKPOINT, [3.5])  # entering a checkpoint: its own warm-up limit
    assert det.limit(1) == 600
    assert det.check(100.0) == []
    beats(det, 1, Phase.STEP, [200.0])  # back to STEP: already warm, 196.5 s in CHECKPOINT is not a STEP sample
    assert det.limit(1) == 5.0
    assert len(det.check(206.0)) == 1
    assert det.check(300.0) == []  # reported once
    beats(det, 1, Phase.STEP, [301.0])
    assert det.check(302.0) == []


def test_resends_are_not_progress_and_ranks_are_independent():
    det = HangDetector(CFG)
    beats(det, 0, Phase.STEP, [0.0, 1.0, 2.0, 3.0])
    beats(det, 1, Phase.STEP, [0.0, 1.0, 2.0, 3.0])
    assert not det.observe(0, Phase.STEP, 3.0)  # the client's background thread resent the last beat
    beats(det, 1, Phase.STEP, [6.0, 7.0])
    assert [h.rank for h in det.check(8.5)] == [0]
    det.forget(0)
    assert det.ranks() == [1]


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="safety_factor"):
        HangConfig(safety_factor=0.5)
    with pytest.raises(ValueError, match="EVAL"):
        HangConfig(initial_limits={Phase.INIT: 1, Phase.STEP: 1, Phase.CHECKPOINT: 1})
