"""No node the job cannot lose: the rendezvous and job store on etcd or on a head node, with real processes.

The launcher tests run real ``stalwart launch`` nodes of one CPU rank each (data parallel across
nodes: 3 nodes train dp=3, 2 train dp=2), against a real etcd (Debian's ``etcd-server``, see
tests/etcd_server.py) or a real ``stalwart store``, and kill the *first* node, an etcd member, or
the store itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from chaos import STEPS, Cluster, assert_recovered, events, faults_detected, trajectory
from etcd_server import EtcdCluster
from polling import free_port, wait_for

from stalwart.jobenv import JOB_STORE_ENV

ROOT = Path(__file__).resolve().parents[2]
# One rank per node, replicas across nodes; a global batch of 12 in microbatches of 2 fits dp 1, 2 and 3.
LAYOUT = [
    "--parallel.dp_replicate",
    "-1",
    "--parallel.dp_shard",
    "1",
    "--training.global_batch_size",
    "12",
    "--training.microbatch_size",
    "2",
]
_REFERENCE: dict[int, float] = {}
ETCD_ELECTION_RDZV = (
    "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=6,join_timeout=300,read_timeout=20"
)


def reference(tmp_path_factory) -> dict[int, float]:
    """The fault-free losses: one node, one rank (dp 1, the same global batch by accumulation)."""
    if not _REFERENCE:
        cluster = Cluster(tmp_path_factory.mktemp("reference"), LAYOUT, nproc=1, healthd=False)
        try:
            cluster.start("node0")
            assert cluster.wait() == {"node0#0": 0}, cluster.logs()
        finally:
            cluster.kill_all()
        _REFERENCE.update(trajectory(cluster.run_dir))
        assert max(_REFERENCE) == STEPS
    return _REFERENCE


class StoreService:
    """``stalwart store`` on a loopback port: the head node's store, which can be killed and started again."""

    def __init__(self, log_dir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"store-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stalwart", "store", "--bind", self.address],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        from stalwart.net import answers

        wait_for(lambda: answers(self.address) or self.proc.poll() is not None, 60, "stalwart store to listen")
        assert self.proc.poll() is None, (log_dir / f"store-{self.starts - 1}.log").read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def agent_worlds(run_dir: Path, node: str) -> list[int]:
    """The world size of every worker group ``node``'s agents started, in time order."""
    return [
        e["world_size"]
        for e in events(run_dir)
        if e["kind"] == "worker_start" and e.get("role") == "agent" and e.get("node_id") == node
    ]


def launcher_lines(cluster: Cluster) -> str:
    """Every line the launchers printed themselves, from their whole logs (torch's C++ traces left out)."""
    return "\n".join(
        line
        for path in sorted(cluster.run_dir.glob("launch-*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith("stalwart launch")
    )


def rank_env(cluster: Cluster, node: str) -> dict[str, str]:
    """The environment of a running rank under ``node``'s launcher (what the agent exported)."""
    ranks = [p for p in psutil.Process(cluster.nodes[node].pid).children(recursive=True) if "train" in p.cmdline()]
    assert ranks, f"no rank runs under {node}"
    return ranks[0].environ()


# ---------------------------------------------------------------- the job store itself (fast)


def test_store_urls_and_a_missing_job_store_fail_in_one_line(monkeypatch):
    from stalwart.parallel.job_store import StoreAddress, StoreAddressError, job_store

    a = StoreAddress.parse("etcd://h1:2379,h2,[::1]:2381/stalwart/job42")
    assert a.endpoints == (("h1", 2379), ("h2", 2379), ("::1", 2381)) and a.prefix == "stalwart/job42"
    assert StoreAddress.parse(a.url) == a
    assert StoreAddress.parse("tcp://head:29400/x").describe() == "the store at head:29400"
    assert StoreAddress.parse("head:29400") == StoreAddress("tcp", (("head", 29400),), "stalwart")  # bare HOST:PORT
    for bad in (":29400", "tcp://h1:1,h2:2/x", "tcp://head:99999/x", "redis://h:1/x"):
        with pytest.raises(StoreAddressError):
            StoreAddress.parse(bad)
    monkeypatch.delenv(JOB_STORE_ENV, raising=False)
    with pytest.raises(StoreAddressError, match="stalwart launch"):
        job_store()


def test_head_node_store_serves_the_job_store_and_clients_reconnect_after_a_restart(tmp_path, monkeypatch):
    from torch.distributed import DistNetworkError, PrefixStore

    from stalwart.parallel.job_store import job_store

    service = StoreService(tmp_path)
    service.start()
    try:
        monkeypatch.setenv(JOB_STORE_ENV, f"tcp://{service.address}/stalwart/t")
        store = job_store(timeout_s=5)
        q1 = PrefixStore("q1", store)  # what the recovery code builds: a fresh prefix per re-formation
        q1.set("k", b"v")
        assert q1.get("k") == b"v" and q1.add("n", 2) == 2 and store.check(["q1/k"])

        service.kill()
        with pytest.raises(DistNetworkError):
            q1.add("n", 1)
        service.start()  # the head node's store is back, empty
        assert not q1.check(["k"]) and q1.add("n", 1) == 1  # the same client object works again

        taken = subprocess.run(  # a second store on the same address: one line, exit 2
            [sys.executable, "-m", "stalwart", "store", "--bind", service.address],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert taken.returncode == 2
        (line,) = [x for x in taken.stderr.splitlines() if x.startswith("stalwart store")]
        assert service.address in line and "--bind" in line, line
    finally:
        service.kill()


def test_etcd_job_store_fails_over_between_members_and_survives_a_full_outage(tmp_path, monkeypatch):
    import etcd as python_etcd

    from stalwart.parallel.job_store import job_store

    etcd = EtcdCluster(tmp_path / "etcd", size=3)
    etcd.start()
    try:
        monkeypatch.setenv(JOB_STORE_ENV, f"etcd://{etcd.endpoints}/stalwart/t")
        store = job_store(timeout_s=5)
        store.set("k", b"v")
        assert store.add("n", 1) == 1

        etcd.kill(0)  # the member the client talks to
        assert store.get("k") == b"v" and store.add("n", 1) == 2  # the other two still have quorum

        etcd.stop()  # every member: no quorum, no answer
        with pytest.raises(python_etcd.EtcdException):
            store.add("n", 1)
        etcd.start()  # back on their data dirs: nothing was lost
        assert store.get("k") == b"v" and store.add("n", 1) == 3
    finally:
        etcd.stop()


def test_launcher_with_no_etcd_member_answering_fails_within_the_connect_timeout(tmp_path):
    endpoint = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stalwart",
            "launch",
            "--config",
            "debug",
            "--rdzv-backend",
            "etcd-v2",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-connect-timeout",
            "2",
            "--run-dir",
            str(tmp_path),
            "--healthd",
            "off",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("stalwart launch")]
    assert endpoint in line and "--enable-v2" in line, line


# ---------------------------------------------------------------- real launchers (slow)


def trained_at_world(run_dir: Path, world: int, after: float) -> bool:
    """A step ended in a worker group of ``world`` ranks that started after ``after`` (a time.time())."""
    evs = events(run_dir)
    starts = [
        e["ts"]
        for e in evs
        if e["kind"] == "worker_start" and e.get("role") == "trainer" and e["world_size"] == world and e["ts"] > after
    ]
    return bool(starts) and any(
        e["kind"] == "step_end" and e.get("role") == "trainer" and e["ts"] > starts[0] for e in evs
    )


def lose_the_first_node_and_bring_it_back(
    cluster: Cluster, tmp_path_factory, at_step_2: Callable[[], None] | None = None
) -> None:
    """Three nodes; node0 (agent and rank) is SIGKILLed at step 5; the others re-form and train; node0 comes back.

    Saves are synchronous so that step 4 is surely committed when node0 dies; rank 0 is slowed from
    step 6 so that the relaunched node0 has time to join before the job ends. ``at_step_2`` runs once
    step 2 is done (steps 2-4 are slowed to leave it time to take effect before the kill).
    """
    cluster.plan = [
        {"kind": "kill_agent", "step": 5, "node": "node0"},
        {"kind": "slow", "step": 6, "rank": 0, "seconds": 2.0, "steps": 4},
    ]
    if at_step_2 is not None:
        cluster.plan.append({"kind": "slow", "step": 2, "rank": 1, "seconds": 1.0, "steps": 3})
    cluster.extra = [*cluster.extra, "--checkpoint.mode", "sync"]
    try:
        for node in ("node0", "node1", "node2"):
            cluster.start(node)
        if at_step_2 is not None:
            wait_for(lambda: max(trajectory(cluster.run_dir), default=0) >= 2, 300, "step 2")
            at_step_2()
        wait_for(lambda: cluster.nodes["node0#0"].poll() is not None, 300, "node0 to be lost")
        lost_at = time.time()
        wait_for(lambda: trained_at_world(cluster.run_dir, 2, lost_at), 180, "node1 and node2 to re-form and train")
        cluster.start("node0")  # the lost node, started again, joins back
        codes = cluster.wait(300)
    finally:
        cluster.kill_all()
    assert codes == {"node0#0": -9, "node1#1": 0, "node2#2": 0, "node0#3": 0}, (codes, cluster.logs())
    worlds = agent_worlds(cluster.run_dir, "node1")
    assert 3 in worlds, worlds
    shrunk = worlds.index(2, worlds.index(3))  # node1 may have started in a smaller round on a loaded machine
    assert 3 in worlds[shrunk:], worlds  # 3 -> 2 -> 3
    assert agent_worlds(cluster.run_dir, "node0")[-1] == 3
    loads = [e["step"] for e in events(cluster.run_dir) if e["kind"] == "ckpt_load" and e.get("rank") == 0]
    assert loads and loads[0] == 4, loads  # the survivors resumed from the step committed before the kill
    assert_recovered(cluster.run_dir, reference(tmp_path_factory), exact=False)


@pytest.mark.slow
def test_etcd_rendezvous_one_member_of_three_lost_unnoticed_then_the_first_node_lost_and_back(
    tmp_path, tmp_path_factory
):
    """Three etcd members: killing the one every client talks to first goes unnoticed (beyond log lines);
    then the first training node is lost, the others re-form and it joins back."""
    etcd = EtcdCluster(tmp_path / "etcd", size=3)
    etcd.start()
    # Killing the member the clients use first may kill etcd's leader: its election (timeout 1 s, longer
    # on a busy 2-core box) must fit in the rendezvous keep-alive expiry, 6 s here, for the loss to go unseen.
    cluster = Cluster(
        tmp_path / "run",
        LAYOUT,
        nnodes="1:3",
        nproc=1,
        backend="etcd-v2",
        rdzv=etcd.endpoints,
        healthd=False,
        extra=["--rdzv-conf", ETCD_ELECTION_RDZV],
    )
    exported: dict[str, str] = {}
    member_lost_at: list[float] = []

    def lose_an_etcd_member() -> None:
        exported.update(rank_env(cluster, "node1#1"))
        etcd.kill(0)
        member_lost_at.append(time.time())

    try:
        lose_the_first_node_and_bring_it_back(cluster, tmp_path_factory, at_step_2=lose_an_etcd_member)
    finally:
        etcd.stop()
    assert exported.get(JOB_STORE_ENV) == f"etcd://{etcd.endpoints}/stalwart/chaos"  # what a rank gets
    lines = launcher_lines(cluster)
    assert "hosting the rendezvous store" not in lines and "rebuild membership" not in lines, lines
    evs = events(cluster.run_dir)
    (kill,) = [e["ts"] for e in evs if e["kind"] == "fault_injected" and e.get("fault") == "kill_agent"]
    assert [f for f in faults_detected(cluster.run_dir) if f["ts"] < kill] == []  # the member loss: no fault
    restarts = [
        e
        for e in evs
        if e["kind"] == "worker_start" and e.get("role") == "agent" and member_lost_at[0] < e["ts"] < kill
    ]
    assert restarts == [], restarts  # the job did not re-form for the lost member


@pytest.mark.slow
def test_first_node_lost_with_the_store_on_a_head_node_the_others_reform_and_it_joins_back(tmp_path, tmp_path_factory):
    service = StoreService(tmp_path / "store")
    service.start()
    try:
        cluster = Cluster(
            tmp_path / "run", LAYOUT, nnodes="1:3", nproc=1, rdzv=service.address, hosted=False, healthd=False
        )
        lose_the_first_node_and_bring_it_back(cluster, tmp_path_factory)
        assert service.proc.poll() is None
    finally:
        service.kill()
    assert "hosting the rendezvous store" not in launcher_lines(cluster)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["head node", "etcd quorum"])
def test_store_lost_for_seconds_the_ranks_train_on_and_membership_is_rebuilt(form, tmp_path, tmp_path_factory):
    """The whole store gone for 5 s: a head-node store that comes back empty, or every etcd member (their
    data kept). The ranks train on; the agents say what is gone; then each re-forms once, and the job ends
    at its target with the reference losses."""
    if form == "head node":
        service = StoreService(tmp_path / "store")
        rdzv, backend, named, down, up = (
            service.address,
            "c10d",
            f"the store at {service.address}",
            service.kill,
            service.start,
        )
    else:
        etcd = EtcdCluster(tmp_path / "etcd", size=3)
        rdzv, backend, named, down, up = etcd.endpoints, "etcd-v2", f"etcd at {etcd.endpoints}", etcd.stop, etcd.start
    up()
    cluster = Cluster(
        tmp_path / "run", LAYOUT, nnodes="2", nproc=1, backend=backend, rdzv=rdzv, hosted=False, healthd=False
    )
    # Slow steps from step 3: the job is still training when the store comes back.
    cluster.plan = [{"kind": "slow", "step": 3, "rank": 0, "seconds": 2.0, "steps": 7}]
    try:
        cluster.start("node0")
        cluster.start("node1")
        wait_for(lambda: max(trajectory(cluster.run_dir), default=0) >= 3, 300, "step 3")
        down()
        lost_at = time.time()
        time.sleep(5)  # past the keep-alive expiry of these tests (1 s x 3)
        up()
        back_at = time.time()
        codes = cluster.wait(300)
    finally:
        cluster.kill_all()
        down()
    lines = launcher_lines(cluster)
    assert codes == {"node0#0": 0, "node1#1": 0}, (codes, cluster.logs())
    assert lines.count(f"stalwart launch: lost {named} (") == 2, lines  # one line per agent
    assert lines.count("re-forming the group to rebuild membership") == 2, lines
    trained = [
        e for e in events(cluster.run_dir) if e["kind"] == "step_end" and e.get("role") == "trainer" and e["rank"] == 0
    ]
    assert any(lost_at < e["ts"] < back_at for e in trained), "no step was trained while the store was gone"
    assert [f["fault"] for f in faults_detected(cluster.run_dir)] == ["store_lost", "store_lost"]
    assert agent_worlds(cluster.run_dir, "node0") == [2, 2]  # one re-rendezvous, the same two nodes
    assert_recovered(cluster.run_dir, reference(tmp_path_factory), exact=False)


def test_a_rank_forms_a_gloo_group_on_a_fresh_prefix_of_the_job_store(tmp_path):
    """What the recovery code does: open the job store through $STALWART_JOB_STORE, form a group on a prefix."""
    service = StoreService(tmp_path / "store")
    service.start()
    env = {**os.environ, JOB_STORE_ENV: f"tcp://{service.address}/stalwart/t"}
    probe = (
        "import datetime, torch.distributed as dist\n"
        "from stalwart.parallel.job_store import job_store\n"
        "pg = dist.ProcessGroupGloo(dist.PrefixStore('q1', job_store()), 0, 1, datetime.timedelta(seconds=10))\n"
        "t = __import__('torch').ones(3)\n"
        "pg.allreduce([t]).wait()\n"
        "print('reformed', t.tolist())\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    finally:
        service.kill()
    assert done.returncode == 0 and "reformed [1.0, 1.0, 1.0]" in done.stdout, done.stderr[-2000:]
