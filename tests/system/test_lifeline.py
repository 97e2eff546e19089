"""Nothing outlives its job: SIGKILL of a launcher (`stalwart train`, a node agent, the demo) ends all it started.

Each test starts the real command, waits until its ranks are training (or, for the start-up case,
merely exist), snapshots the launcher's whole process tree, SIGKILLs the launcher alone, and
requires every process of that tree, and any process naming the run directory, gone within 10 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from polling import free_port, wait_for
from tiny import tiny_overrides

from stalwart.events import read_events
from stalwart.jobenv import PARENT_PID_ENV

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 10.0
TINY = tiny_overrides(model__n_layers=2, training__steps=400, health__fingerprint_every=0, checkpoint__interval=5)


def start(argv: list[str], run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}  # pytest is no stalwart launcher
    env["PYTHONWARNINGS"] = "ignore"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "stalwart", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def naming(run_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names the run directory (orphans re-parented before the snapshot too)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(str(run_dir) in arg for arg in p.info["cmdline"] or ()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def trainer_stepped(run_dir: Path) -> bool:
    return any(e["kind"] == "step_end" and e.get("role") == "trainer" for e in read_events(run_dir))


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def kill_and_expect_nothing_left(launcher: subprocess.Popen, run_dir: Path, min_children: int) -> None:
    family = wait_for(
        lambda: (procs := tree(launcher.pid)) and len(procs) >= min_children and procs,
        120,
        f"{min_children} processes under the launcher",
    )
    family = {p.pid: p for p in [*family, *naming(run_dir)] if p.pid != launcher.pid}
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(10)
    deadline = time.monotonic() + GONE_WITHIN_S
    left = alive(list(family.values()))
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive(left)
    left += [p for p in alive(naming(run_dir)) if p.pid not in family]
    described = [(p.pid, " ".join(p.cmdline()[:6])) for p in left if p.is_running()]
    for p in left:  # leave nothing behind for the next test, whatever happened
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not described, f"alive {GONE_WITHIN_S:g} s after SIGKILL of the launcher: {described}"


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "start-up"])
def test_sigkill_of_stalwart_train_ends_its_ranks(tmp_path: Path, when: str) -> None:
    run_dir = tmp_path / "run"
    launcher = start(
        ["train", "--config", "debug", "--nproc-per-node", "2", "--job.run_dir", str(run_dir), *TINY], run_dir
    )
    try:
        if when == "training":
            wait_for(lambda: trainer_stepped(run_dir), 180, "the ranks' first step")
        kill_and_expect_nothing_left(launcher, run_dir, min_children=2)
        if when == "start-up":
            assert not trainer_stepped(run_dir)  # killed before training: the orphans never trained either
    finally:
        launcher.kill()


@pytest.mark.slow
def test_sigkill_of_a_node_agent_ends_its_ranks_and_healthd(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launcher = start(
        [
            "launch",
            "--config",
            "debug",
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--healthd",
            f"127.0.0.1:{free_port()}",
            "--controller",
            "off",
            "--monitor-interval",
            "0.2",
            "--run-dir",
            str(run_dir),
            *TINY,
        ],
        run_dir,
    )
    try:
        wait_for(lambda: trainer_stepped(run_dir), 180, "the ranks' first step")
        kill_and_expect_nothing_left(launcher, run_dir, min_children=3)  # healthd and two ranks
    finally:
        launcher.kill()


@pytest.mark.slow
def test_sigkill_of_the_demo_ends_every_node(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    demo = start(
        [
            "demo",
            "--config",
            "debug",
            "--nodes",
            "2",
            "--nproc-per-node",
            "1",
            "--steps",
            "400",
            "--run-dir",
            str(run_dir),
            *TINY,
        ],
        run_dir,
    )
    try:
        wait_for(lambda: trainer_stepped(run_dir), 240, "the demo's first step")
        # controller, two launchers, their healthd daemons and one rank each
        kill_and_expect_nothing_left(demo, run_dir, min_children=7)
    finally:
        demo.kill()
