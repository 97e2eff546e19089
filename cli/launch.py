"""``stalwart launch``: the elastic agent of one node, torchrun-compatible flags.

    stalwart launch --config C --nnodes MIN:MAX --nproc-per-node N --rdzv-endpoint HOST:PORT --rdzv-id JOB
                    [--max-restarts K] [--run-dir D] [--healthd ADDR|off] [--controller ADDR|off]
                    [--section.key VALUE ...]

The flags are defined here; :mod:`stalwart.launcher.main` checks them and runs the agent.
"""

from __future__ import annotations

import argparse
import os
import socket

from stalwart.cli.command import Subparsers, subcommand
from stalwart.jobenv import JOB_ID_ENV

DEFAULT_HEALTHD = "127.0.0.1:50051"


def register(sub: Subparsers) -> None:
    p = subcommand(
        sub,
        "launch",
        run=run,
        overrides=True,
        allow_abbrev=False,
        help="run the elastic agent of one node (torchrun-compatible flags; shrinks, grows, survives lost nodes)",
        description="Elastic agent of one node (torch.distributed.elastic). Extra --section.key VALUE arguments "
        "override the config.",
    )
    p.add_argument("--config", required=True, help="TOML file, or a shipped config name")
    p.add_argument("--nnodes", default="1", help="N or MIN:MAX nodes (default 1)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, help="ranks on this node (default 1)")
    p.add_argument(
        "--rdzv-backend",
        "--rdzv_backend",
        default="c10d",
        choices=("c10d", "etcd", "etcd-v2"),
        help="c10d (default): the TCP store at --rdzv-endpoint, served by `stalwart store` on a head node (or, when "
        "nothing serves it, by the launcher on that host: then the one node the job cannot lose); etcd-v2 (or etcd): "
        "etcd's v2 API, --rdzv-endpoint listing its members",
    )
    p.add_argument(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        default="127.0.0.1:29400",
        help="HOST:PORT of the rendezvous store (default 127.0.0.1:29400); for etcd HOST:PORT[,HOST:PORT...]",
    )
    p.add_argument("--rdzv-id", "--rdzv_id", default="stalwart", help="job id shared by all nodes (e.g. $SLURM_JOB_ID)")
    p.add_argument(
        "--rdzv-conf",
        "--rdzv_conf",
        default="",
        help="torch rendezvous settings key=value,... (join_timeout, last_call_timeout, keep_alive_interval, "
        "read_timeout, ...)",
    )
    p.add_argument(
        "--rdzv-connect-timeout",
        type=float,
        default=60.0,
        help="seconds to reach the rendezvous store before giving up (default 60)",
    )
    p.add_argument(
        "--max-restarts",
        "--max_restarts",
        type=int,
        default=3,
        help="worker-group restarts after failures (node joins do not count; default 3)",
    )
    p.add_argument(
        "--monitor-interval",
        "--monitor_interval",
        type=float,
        default=0.5,
        help="seconds between checks of the ranks (default 0.5)",
    )
    p.add_argument(
        "--local-addr",
        "--local_addr",
        default=None,
        help="this node's address as the others reach it (default: its FQDN)",
    )
    p.add_argument(
        "--node-id", default=socket.gethostname(), help="this node's name in the exclusion list (default: host name)"
    )
    p.add_argument("--run-dir", default=None, help="the job's run directory (default: the config's job.run_dir)")
    p.add_argument(
        "--healthd",
        default=DEFAULT_HEALTHD,
        help=f"node health daemon address; started when none answers (default {DEFAULT_HEALTHD}; 'off' for none)",
    )
    p.add_argument(
        "--controller",
        default="",
        help="job controller address; default: started on the rendezvous host ('off' for none)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=30.0,
        help="seconds of silence after which a peer node counts as lost (default 30)",
    )
    p.add_argument(
        "--failure-stop-timeout",
        type=float,
        default=5.0,
        help="seconds a failed group's ranks get between SIGTERM and SIGKILL (default 5)",
    )


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from stalwart.cli.train import refuse_a_second_job
    from stalwart.launcher.main import check_launch, launch
    from stalwart.runtime.plan import check_run_directory, plan_job

    a, cfg, nodes = check_launch(args, overrides)  # bad flags and configs cost nothing
    check_run_directory(cfg, plan_job(cfg, nodes.active_nodes(a.min_nodes) * a.nproc_per_node))
    # Every node of one job (and its restarts) is the same run-lease holder; another job is refused here.
    os.environ[JOB_ID_ENV] = f"launch:{args.rdzv_id}@{args.rdzv_endpoint}"  # what the ranks hold the lease as
    refuse_a_second_job(cfg, os.environ[JOB_ID_ENV])
    return launch(args, overrides)
