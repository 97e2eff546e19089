"""``stalwart launch``: bad flags fail fast; real launchers shrink, grow, survive a cut link and preemption.

The multi-node tests run real ``stalwart launch`` processes on this machine as "nodes" of 2 ranks with
tp=2 on the debug model (so dp = number of nodes), the rendezvous on localhost or, for the network
test, across Linux network namespaces joined by a veth pair (addresses from 198.18.0.0/15).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from polling import free_port
from tiny import tiny_overrides

from stalwart.events import read_events
from stalwart.launcher import EXIT_NODE_EXCLUDED, exclude_node
from stalwart.launcher.exclusion import ExclusionWatch
from stalwart.launcher.main import LaunchError, parse_nnodes, parse_rdzv_conf
from stalwart.launcher.plan import plan_nodes
from stalwart.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "stalwart", "launch", "--config", "debug"]
# 2 ranks per node with tp=2: dp = nodes; global batch 8 / microbatch 4 fits dp 1 and 2.
TINY = tiny_overrides(parallel__tp=2, model__n_layers=2, health__fingerprint_every=0, checkpoint__interval=2)
FAST_RDZV = [
    "--rdzv-conf",
    "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300,read_timeout=20",
    "--monitor-interval",
    "0.2",
    "--peer-timeout",
    "6",
    "--healthd",
    "off",
    "--controller",
    "off",
]


def run_launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def error_line(done: subprocess.CompletedProcess) -> str:
    """The launcher's own message (torch's C++ warnings may precede it)."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("stalwart launch")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- bad flags (fast)


def test_min_larger_than_max_fails_in_one_line():
    t0 = time.monotonic()
    done = run_launch("--nnodes", "3:2", "--healthd", "off")
    assert done.returncode == 2
    assert "MIN (3) is larger than MAX (2)" in error_line(done)
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("spec", ["two", "0:2", "1:x"])
def test_nnodes_must_be_whole_numbers(spec):
    with pytest.raises(LaunchError, match="--nnodes"):
        parse_nnodes(spec)
    assert parse_nnodes("2") == (2, 2) and parse_nnodes("1:4") == (1, 4)


def test_rdzv_conf_parsing():
    assert parse_rdzv_conf("join_timeout=900, last_call_timeout=5") == {"join_timeout": "900", "last_call_timeout": "5"}
    with pytest.raises(LaunchError, match="key=value"):
        parse_rdzv_conf("join_timeout")


def test_layout_not_fitting_the_node_count_fails_in_one_line(tmp_path):
    done = run_launch(
        "--nnodes", "1:2", "--nproc-per-node", "2", "--parallel.tp", "4", "--run-dir", str(tmp_path), "--healthd", "off"
    )
    assert done.returncode == 2
    line = error_line(done)
    assert "starts with 2 ranks" in line and "tp×pp = 1×1×4×1 = 4" in line and "--nnodes 2:2" in line, line


def test_unreachable_rendezvous_endpoint_fails_within_the_connect_timeout(tmp_path):
    t0 = time.monotonic()
    done = run_launch(
        "--nnodes",
        "1",
        "--rdzv-endpoint",
        "198.18.255.254:29400",
        "--rdzv-connect-timeout",
        "2",
        "--run-dir",
        str(tmp_path),
        "--healthd",
        "off",
    )
    assert done.returncode == 2
    line = error_line(done)
    assert "198.18.255.254:29400" in line and "--rdzv-endpoint" in line, line
    assert time.monotonic() - t0 < 90  # imports on a loaded machine; torch's default would be 900 s


# ---------------------------------------------------------------- plan, exclusion, spares (fast)


def test_node_plan_keeps_tp_and_finds_the_usable_node_counts():
    cfg = load_config("debug", ["--parallel.tp", "2"])  # global batch 32, microbatch 8: dp in {1, 2, 4}
    plan = plan_nodes(cfg, nproc_per_node=2, min_nodes=1, max_nodes=5)
    assert plan.usable == (1, 2, 4)
    assert [plan.active_nodes(n) for n in range(1, 6)] == [1, 2, 2, 4, 4]
    assert plan.rdzv_max_nodes == 4  # a 5th node waits in torch's redundancy list
    assert plan_nodes(cfg, 2, 3, 3).active_nodes(3) == 2  # 3 nodes: 2 train, 1 hot spare


def test_excluded_node_exits_93_before_joining(tmp_path):
    watch = ExclusionWatch(tmp_path, "nodeB")
    assert watch.reason() is None
    assert exclude_node(tmp_path, "nodeB", "gpu3: xid 79") is True
    assert exclude_node(tmp_path, "nodeB", "again") is False
    assert watch.reason() == "gpu3: xid 79" and ExclusionWatch(tmp_path, "nodeA").reason() is None
    done = run_launch("--nnodes", "1:2", "--node-id", "nodeB", "--run-dir", str(tmp_path), "--healthd", "off")
    assert done.returncode == EXIT_NODE_EXCLUDED, done.stderr[-2000:]
    assert "nodeB" in error_line(done) and "xid 79" in error_line(done)


def test_spare_rank_idles_until_sigterm_then_exits_0(tmp_path):
    """A rank past the narrowed WORLD_SIZE joins no process group and leaves cleanly when stopped."""
    env = {
        **os.environ,
        "STALWART_LAUNCHER": "1",
        "RANK": "5",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "TORCHELASTIC_RUN_ID": "x",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "stalwart", "train", "--config", "debug", "--job.run_dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert "hot spare" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert not (tmp_path / "events").exists()  # no trainer started


def test_peer_watch_reports_a_silent_peer():
    from torch.distributed import HashStore

    from stalwart.launcher.agent import PeerWatch

    store = HashStore()
    me, peer = (
        PeerWatch(store, 0, 2, timeout_s=1.0, interval_s=0.1),
        PeerWatch(store, 1, 2, timeout_s=1.0, interval_s=0.1),
    )
    try:
        time.sleep(0.5)
        me.silent_for()
        time.sleep(0.5)
        assert me.silent_for() < 0.5  # the peer beats
        peer.stop()
        time.sleep(0.3)
        me.silent_for()
        time.sleep(1.2)
        assert me.silent_for() > 1.0
    finally:
        me.stop()
        peer.stop()


# ---------------------------------------------------------------- real launchers (slow)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (ranks run in sessions of their own)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for p in children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)
    proc.wait(timeout=30)


class Node:
    """One launcher, its output in a file (read while it runs)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern, re.MULTILINE).search(self.text(), after)
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode} before /{pattern}/:\n{self.text()[-4000:]}"
                )
            time.sleep(0.3)
        raise AssertionError(f"{self.name}: no /{pattern}/ within {timeout}s:\n{self.text()[-4000:]}")

    def exit_code(self, timeout: float) -> int:
        """The launcher's exit code; a launcher still running after ``timeout`` fails the test with its log."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.text()[-4000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc)


def wait_any(
    nodes: list[Node], pattern: str, timeout: float, after: dict[str, int] | None = None
) -> tuple[Node, re.Match]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in nodes:
            m = re.compile(pattern, re.MULTILINE).search(n.text(), (after or {}).get(n.name, 0))
            if m:
                return n, m
        time.sleep(0.3)
    raise AssertionError(
        f"no /{pattern}/ within {timeout}s:\n" + "\n".join(f"--- {n.name}\n{n.text()[-3000:]}" for n in nodes)
    )


def world_sizes(run_dir: Path) -> list[int]:
    """The world size of each worker group in time order (rank 0's worker_start events)."""
    starts = sorted(
        (
            e
            for e in read_events(run_dir)
            if e["kind"] == "worker_start" and e.get("role") == "trainer" and e["rank"] == 0
        ),
        key=lambda e: e["ts"],
    )
    return [e["world_size"] for e in starts]


def committed(run_dir: Path) -> set[int]:
    return {e["step"] for e in read_events(run_dir) if e["kind"] == "ckpt_commit"}


@pytest.mark.slow
def test_kill_a_node_shrink_then_grow_then_preempt_and_relaunch(tmp_path):
    run_dir, port = tmp_path / "run", free_port()

    def argv(node_id: str, steps: int = 100000) -> list[str]:
        return [
            *LAUNCH,
            "--nnodes",
            "1:2",
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "t",
            *FAST_RDZV,
            "--node-id",
            node_id,
            "--run-dir",
            str(run_dir),
            *TINY,
            "--training.steps",
            str(steps),
        ]

    nodes = [Node("A", argv("A"), tmp_path), Node("B", argv("B"), tmp_path)]
    try:
        for n in nodes:
            n.wait_for(r"node rank \d of 2 \(2 training\)", timeout=180)
        wait_any(nodes, r"^step +4/", timeout=180)
        host = next(n for n in nodes if "hosting the rendezvous store" in n.text())
        victim = next(n for n in nodes if n is not host)
        mark = len(host.text())
        kill_tree(victim.proc)  # the node dies: its agent and its ranks, no clean-up

        host.wait_for(r"node rank 0 of 1 \(1 training\)", timeout=120, after=mark)
        resumed = int(host.wait_for(r"^resumed from step (\d+)", timeout=180, after=mark).group(1))
        assert resumed >= 2 and resumed in committed(run_dir)
        host.wait_for(rf"^step +{resumed + 2}/", timeout=120, after=mark)  # trains on alone, dp halved

        mark = len(host.text())
        joiner = Node("C", argv("C"), tmp_path)
        nodes.append(joiner)
        host.wait_for(r"node rank \d of 2 \(2 training\)", timeout=180, after=mark)
        marks = {n.name: len(n.text()) for n in nodes}
        wait_any([host, joiner], r"^step +\d+/", timeout=180, after=marks)  # a step with the grown group

        for n in (host, joiner):
            n.proc.send_signal(signal.SIGTERM)
        assert host.exit_code(120) == 0, host.text()[-3000:]
        assert joiner.exit_code(120) == 0, joiner.text()[-3000:]
        saved = [
            int(s)
            for n in (host, joiner)
            for s in re.findall(r"^preempted: committed step (\d+)", n.text()[marks[n.name] :], re.MULTILINE)
        ]
        assert len(saved) == 1, saved  # rank 0 reports the emergency checkpoint of the whole job
        last = saved[0]
        assert last in committed(run_dir)
        assert world_sizes(run_dir)[-3:] == [4, 2, 4], world_sizes(run_dir)

        target = last + 3
        relaunch = Node("A2", argv("A", steps=target), tmp_path)
        nodes.append(relaunch)
        assert relaunch.exit_code(240) == 0, relaunch.text()[-3000:]
        assert f"resumed from step {last}" in relaunch.text()
        assert re.search(rf"^step +{target}/{target}", relaunch.text(), re.MULTILINE)
        assert "training finished" in relaunch.text()
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.slow
def test_third_node_idles_as_hot_spare_and_ends_with_the_job(tmp_path):
    """1 rank per node, dp must divide 4: of 3 nodes 2 train, the third waits and exits 0 with them."""
    run_dir, port = tmp_path / "run", free_port()
    argv = [
        *LAUNCH,
        "--nnodes",
        "1:4",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "s",
        *FAST_RDZV,
        "--run-dir",
        str(run_dir),
        *TINY,
        "--parallel.tp",
        "1",
        "--training.global_batch_size",
        "16",
        "--training.steps",
        "6",
    ]
    nodes = [Node(name, [*argv, "--node-id", name], tmp_path) for name in "ABC"]
    try:
        for n in nodes:
            n.wait_for(r"node rank \d of 3 \(2 training\)", timeout=180)
        for n in nodes:
            assert n.exit_code(240) == 0, n.text()[-3000:]
        spares = [n for n in nodes if "node rank 2 of 3 (2 training): hot spare" in n.text()]
        assert len(spares) == 1 and "rank 2: hot spare (the layout trains on 2 ranks)" in spares[0].text()
        assert world_sizes(run_dir) == [2]
        assert max(e["step"] for e in read_events(run_dir) if e["kind"] == "step_end") == 6
    finally:
        for n in nodes:
            n.stop()


# ---------------------------------------------------------------- network namespaces (slow, root)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 198.18.0.1 (A) and 198.18.0.2 (B); removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    ns = {"A": f"stw-a-{tag}", "B": f"stw-b-{tag}"}
    dev = {"A": f"stwa{tag}", "B": f"stwb{tag}"}
    probe = _ip("netns", "add", ns["A"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (ip netns add: {probe.stderr.strip() or probe.returncode})")
    try:
        _ip("netns", "add", ns["B"])
        _ip("link", "add", dev["A"], "netns", ns["A"], "type", "veth", "peer", "name", dev["B"], "netns", ns["B"])
        for name, addr in (("A", "198.18.0.1"), ("B", "198.18.0.2")):
            _ip("-n", ns[name], "addr", "add", f"{addr}/24", "dev", dev[name])
            _ip("-n", ns[name], "link", "set", dev[name], "up")
            _ip("-n", ns[name], "link", "set", "lo", "up")
        yield {"ns": ns, "dev": dev, "addr": {"A": "198.18.0.1", "B": "198.18.0.2"}}
    finally:
        for name in ns.values():
            _ip("netns", "del", name, check=False)


@pytest.mark.slow
def test_two_hosts_one_cut_off_the_other_continues_alone(tmp_path, two_hosts):
    run_dir, ns, dev, addr = tmp_path / "run", two_hosts["ns"], two_hosts["dev"], two_hosts["addr"]

    def node(name: str) -> Node:
        argv = [
            "ip",
            "netns",
            "exec",
            ns[name],
            *LAUNCH,
            "--nnodes",
            "1:2",
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            f"{addr['A']}:29400",
            "--rdzv-id",
            "netns",
            "--local-addr",
            addr[name],
            *FAST_RDZV,
            "--node-id",
            name,
            "--run-dir",
            str(run_dir),
            *TINY,
            "--training.steps",
            "100000",
        ]
        return Node(name, argv, tmp_path, env={**os.environ, "GLOO_SOCKET_IFNAME": dev[name]})

    a = node("A")
    nodes = [a]
    try:
        a.wait_for("hosting the rendezvous store", timeout=120)
        nodes.append(node("B"))
        for n in nodes:
            n.wait_for(r"node rank \d of 2 \(2 training\)", timeout=180)
        wait_any(nodes, r"^step +4/", timeout=180)
        mark = len(a.text())
        _ip("-n", ns["B"], "link", "set", dev["B"], "down")  # B is cut off

        a.wait_for(r"node rank 0 of 1 \(1 training\)", timeout=120, after=mark)
        resumed = int(a.wait_for(r"^resumed from step (\d+)", timeout=180, after=mark).group(1))
        a.wait_for(rf"^step +{resumed + 2}/", timeout=120, after=mark)
        a.proc.send_signal(signal.SIGTERM)
        assert a.exit_code(120) == 0, a.text()[-3000:]
        assert world_sizes(run_dir)[-2:] == [4, 2], world_sizes(run_dir)
    finally:
        for n in nodes:
            n.stop()
