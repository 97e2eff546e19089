"""The node agent's main: check ``stalwart launch``'s flags (:mod:`stalwart.cli.launch`), then run the agent.

Order of work, cheapest check first so bad input costs nothing: flags → config and layout against the
node range → exclusion list → rendezvous store (short connect timeout) → healthd / controller →
the agent. Exit codes: 0 finished or preempted (SIGTERM: ranks checkpoint, then exit), 1 ranks
failed past --max-restarts, 2 bad input, 93 this node is excluded.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stalwart.errors import UserError
from stalwart.jobenv import CONTROLLER_ENV, HEALTHD_ENV, JOB_STORE_ENV, LAUNCHER_ENV, NODE_ID_ENV
from stalwart.launcher.exclusion import EXIT_NODE_EXCLUDED

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import RendezvousHandler

    from stalwart.launcher.exclusion import ExclusionWatch
    from stalwart.launcher.plan import NodePlan
    from stalwart.launcher.rendezvous import Rendezvous
    from stalwart.runtime.config import Config


class LaunchError(UserError):
    """Bad flags; the message names the fix."""


@dataclass(frozen=True)
class LaunchArgs:
    config: str
    overrides: list[str]
    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    rdzv_backend: str
    rdzv_endpoint: str
    rdzv_id: str
    rdzv_conf: dict[str, str]
    rdzv_connect_timeout: float
    max_restarts: int
    monitor_interval: float
    local_addr: str | None
    node_id: str
    run_dir: str | None
    healthd: str
    controller: str
    peer_timeout: float
    failure_stop_timeout: float


MAX_NODES = 16384
MAX_RANKS_PER_NODE = 1024
_SECONDS = 7 * 24 * 3600.0  # a week: a longer timeout is a typo


def parse_nnodes(spec: str) -> tuple[int, int]:
    lo, sep, hi = spec.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi if sep else lo)
    except ValueError:
        raise LaunchError(f"--nnodes {spec!r}: write N or MIN:MAX with whole numbers (e.g. 2:4)") from None
    if lo_n < 1:
        raise LaunchError(f"--nnodes {spec}: MIN must be at least 1")
    if hi_n > MAX_NODES:
        raise LaunchError(f"--nnodes {spec}: MAX must be at most {MAX_NODES} nodes")
    if lo_n > hi_n:
        raise LaunchError(f"--nnodes {spec}: MIN ({lo_n}) is larger than MAX ({hi_n}); write --nnodes {hi_n}:{lo_n}")
    return lo_n, hi_n


def parse_rdzv_conf(spec: str) -> dict[str, str]:
    conf = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise LaunchError(
                f"--rdzv-conf {spec!r}: write key=value[,key=value] (e.g. join_timeout=900,last_call_timeout=30)"
            )
        conf[key.strip()] = value.strip()
    return conf


def launch_args(args: argparse.Namespace, overrides: list[str]) -> LaunchArgs:
    """Checked :class:`LaunchArgs` from the parsed ``stalwart launch`` flags (see :mod:`stalwart.cli.launch`)."""
    min_nodes, max_nodes = parse_nnodes(args.nnodes)
    if not 1 <= args.nproc_per_node <= MAX_RANKS_PER_NODE:
        raise LaunchError(
            f"--nproc-per-node {args.nproc_per_node}: must be at least 1 and at most {MAX_RANKS_PER_NODE} ranks; "
            "use the number of accelerators of this node (e.g. 8)"
        )
    for flag, value in (
        ("--peer-timeout", args.peer_timeout),
        ("--rdzv-connect-timeout", args.rdzv_connect_timeout),
        ("--monitor-interval", args.monitor_interval),
    ):
        if not 0 < value <= _SECONDS:  # NaN fails this too
            raise LaunchError(f"{flag} {value:g}: must be a positive number of seconds, at most {_SECONDS:g}")
    if not 0 <= args.failure_stop_timeout <= _SECONDS:
        raise LaunchError(
            f"--failure-stop-timeout {args.failure_stop_timeout:g}: must be 0 or a positive number of seconds, at "
            f"most {_SECONDS:g}"
        )
    if not 0 <= args.max_restarts <= 10**6:
        raise LaunchError(f"--max-restarts {args.max_restarts}: must be >= 0 and at most 1000000 (e.g. 3)")
    for flag, value in (
        ("--rdzv-id", args.rdzv_id),
        ("--node-id", args.node_id),
        ("--rdzv-endpoint", args.rdzv_endpoint),
    ):
        if not value.strip():
            raise LaunchError(f"{flag} is empty; give it a value (see stalwart launch --help)")
    return LaunchArgs(
        args.config,
        overrides,
        min_nodes,
        max_nodes,
        args.nproc_per_node,
        args.rdzv_backend,
        args.rdzv_endpoint,
        args.rdzv_id,
        parse_rdzv_conf(args.rdzv_conf),
        args.rdzv_connect_timeout,
        args.max_restarts,
        args.monitor_interval,
        args.local_addr,
        args.node_id,
        args.run_dir,
        args.healthd,
        args.controller,
        args.peer_timeout,
        args.failure_stop_timeout,
    )


class Terminated(Exception):
    """SIGTERM/SIGINT to the launcher; after the ranks start torch raises its SignalException instead."""

    def __init__(self, sigval: signal.Signals) -> None:
        super().__init__(sigval.name)
        self.sigval = sigval


def _on_signal(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum))


def _stopped_by(sigval: signal.Signals) -> int:
    """Preemption: the ranks were sent the same signal and checkpoint; exit 0 so schedulers requeue cleanly."""
    print(f"stalwart launch: {sigval.name}: the ranks were told to checkpoint and stop; exiting", flush=True)
    return 0 if sigval == signal.SIGTERM else 128 + sigval


def launch(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run this node's agent until the job ends; the exit code says how (module docstring)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        return _launch(args, overrides)
    except Terminated as e:
        return _stopped_by(e.sigval)


def check_launch(args: argparse.Namespace, overrides: list[str]) -> tuple[LaunchArgs, Config, NodePlan]:
    """Flags, config and the node plan, every check done before anything starts; one UserError otherwise.

    No files, network or processes are touched: ``stalwart launch`` runs it first, tests in-process.
    """
    from stalwart.launcher.plan import plan_nodes
    from stalwart.runtime.config import load_config

    a = launch_args(args, overrides)
    cfg = load_config(a.config, launch_overrides(a))
    return a, cfg, plan_nodes(cfg, a.nproc_per_node, a.min_nodes, a.max_nodes)


def launch_overrides(a: LaunchArgs) -> list[str]:
    """The config overrides every rank of this node gets: the user's, and ``--run-dir`` as ``job.run_dir``."""
    return [*a.overrides, *(["--job.run_dir", a.run_dir] if a.run_dir else [])]


def _launch(args: argparse.Namespace, overrides: list[str]) -> int:
    from stalwart.launcher.exclusion import ExclusionWatch
    from stalwart.launcher.rendezvous import RendezvousOptions, build_handler

    a, cfg, plan = check_launch(args, overrides)
    overrides = launch_overrides(a)
    try:
        exclusion = ExclusionWatch(cfg.run_dir, a.node_id)
        reason = exclusion.reason()
    except (ValueError, OSError) as e:  # a malformed or unreadable exclusion list
        raise UserError(str(e)) from None
    if reason is not None:
        print(
            f"stalwart launch: node {a.node_id} is on {exclusion.list.path} ({reason}); not joining (exit "
            f"{EXIT_NODE_EXCLUDED})",
            file=sys.stderr,
        )
        return EXIT_NODE_EXCLUDED
    if plan.rdzv_max_nodes < a.max_nodes:
        print(
            f"stalwart launch: the layout trains on at most {plan.rdzv_max_nodes} of {a.max_nodes} nodes; later nodes "
            "wait as hot spares",
            flush=True,
        )
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a fresh worker store per round: safe when node 0 changes
    rdzv = build_handler(
        RendezvousOptions(
            a.rdzv_backend,
            a.rdzv_endpoint,
            a.rdzv_id,
            a.min_nodes,
            plan.rdzv_max_nodes,
            a.local_addr,
            a.rdzv_conf,
            a.rdzv_connect_timeout,
        )
    )
    if rdzv.hosting:
        print(
            f"stalwart launch: hosting the rendezvous store on {a.rdzv_endpoint} (this node is the one the job "
            "cannot lose: serve it with `stalwart store` on a head node, or use --rdzv-backend etcd-v2)",
            flush=True,
        )
    return _run_agent(a, cfg, plan, exclusion, rdzv, overrides)


def _run_agent(
    a: LaunchArgs,
    cfg: Config,
    plan: NodePlan,
    exclusion: ExclusionWatch,
    rdzv: Rendezvous,
    overrides: list[str],
) -> int:
    from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousError

    from stalwart.events import EventKind, EventLog
    from stalwart.launcher import services
    from stalwart.launcher.agent import AgentOptions, NodeExcluded, StalwartAgent
    from stalwart.launcher.store_watch import OutageTolerantHandler, StoreWatch, first_line

    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "WARNING"), format="%(asctime)s launch %(name)s %(levelname)s %(message)s"
    )
    run_dir = Path(cfg.run_dir)
    procs = []
    health = None
    controller = "" if a.controller == "off" else a.controller
    if a.controller == "" and rdzv.hosting:
        proc, controller = services.start_controller(run_dir, rdzv.store_host)
        procs.append(proc)
    elif a.controller == "" and rdzv.store_host:  # beside the head-node store, or the launcher hosting it
        controller = f"{rdzv.store_host}:{services.CONTROLLER_GRPC_PORT}"
    if controller:
        os.environ[CONTROLLER_ENV] = controller
    if a.healthd != "off":
        hang_kill = "culprit" if cfg.recovery.in_process else "group"
        procs.append(services.ensure_healthd(a.healthd, run_dir, a.node_id, controller, hang_kill))
        os.environ[HEALTHD_ENV] = a.healthd
        health = services.HealthWatch(a.healthd)
    os.environ[LAUNCHER_ENV] = "1"
    os.environ[NODE_ID_ENV] = a.node_id
    os.environ[JOB_STORE_ENV] = rdzv.store.url

    events = EventLog(run_dir, role="agent")
    store_watch = StoreWatch(rdzv.store.describe(), rdzv.keep_alive_expiry_s, rdzv.reseed)
    handler = OutageTolerantHandler(rdzv.handler, store_watch, float(a.rdzv_conf.get("join_timeout", 600)))
    spec = WorkerSpec(
        role="trainer",
        local_world_size=a.nproc_per_node,
        entrypoint=sys.executable,
        args=("-m", "stalwart", "train", "--config", a.config, *overrides),
        rdzv_handler=handler,
        max_restarts=a.max_restarts,
        monitor_interval=a.monitor_interval,
        local_addr=a.local_addr,
    )
    opts = AgentOptions(
        a.node_id,
        plan,
        grace_s=cfg.checkpoint.preemption_grace_s,
        failure_stop_s=a.failure_stop_timeout,
        peer_timeout_s=a.peer_timeout,
        replace_lost_ranks=cfg.recovery.in_process,
        max_replacements=cfg.recovery.max_reformations,
        job_store=os.environ.get(JOB_STORE_ENV, ""),
    )
    agent = StalwartAgent(spec, DefaultLogsSpecs(), opts, exclusion, health, events, store_watch)
    try:
        result = agent.run()
    except (Terminated, SignalException) as e:
        return _stopped_by(e.sigval)
    except NodeExcluded as e:
        events.emit(EventKind.NODE_EXCLUDED, node_id=a.node_id, reason=str(e))
        print(
            f"stalwart launch: node {a.node_id} is excluded ({e}); leaving the job (exit {EXIT_NODE_EXCLUDED})",
            flush=True,
        )
        return EXIT_NODE_EXCLUDED
    except RendezvousError as e:
        what = store_watch.describe if store_watch.down else "the rendezvous"
        print(f"stalwart launch: rendezvous failed on {what}: {first_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # DistNetworkError / DistStoreError: the store is gone or unreachable
        print(
            f"stalwart launch: lost {store_watch.describe} ({first_line(e)}); this node cannot continue: start the "
            "store again and relaunch (the job resumes from its newest checkpoint)",
            file=sys.stderr,
        )
        return 1
    finally:
        agent.close()
        if health is not None:
            health.close()
        services.stop(procs)
        events.close()
    if result is None:  # torch: the rendezvous closed while this node waited as a spare
        print("stalwart launch: the job ended while this node waited as a spare", flush=True)
        return 0
    _close_rendezvous(handler)  # the job is over (finished, or failed past --max-restarts): nobody may join it
    if result.state != WorkerState.SUCCEEDED:  # FAILED, or UNHEALTHY (a lost peer) with no restarts left
        what = "the worker group stayed unhealthy (a lost peer)"
        if result.failures:
            rank, failure = min(result.failures.items())
            what = f"rank {rank} exited with code {failure.exitcode}"
        print(f"stalwart launch: {what} after {a.max_restarts} restarts; see the log above", file=sys.stderr)
        return 1
    print("stalwart launch: training finished", flush=True)
    return 0


def _close_rendezvous(handler: RendezvousHandler) -> None:
    try:
        handler.shutdown()
    except Exception as e:  # the store's node may have finished first
        logging.getLogger(__name__).info("rendezvous already closed: %s", e)
