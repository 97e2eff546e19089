"""``stalwart store --bind HOST:PORT``: the job's c10d store on a head node, until SIGTERM/SIGINT.

Run it on a host that trains nothing (the controller's, a Slurm head component, a Kubernetes
Deployment); launchers reach it with ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` and then no
training node is special: any of them can be lost, the first one included.
"""

from __future__ import annotations

import argparse

from stalwart.cli.command import Subparsers, subcommand

DEFAULT_BIND = "0.0.0.0:29400"


def register(sub: Subparsers) -> None:
    p = subcommand(
        sub,
        "store",
        run=run,
        help="serve the job's rendezvous store on a head node (no training node holds it)",
        description="The job's c10d TCP store, served on a host that trains nothing: launchers rendezvous on it "
        "and ranks re-form process groups on it.",
    )
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"host:port to serve on (default {DEFAULT_BIND})")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from stalwart.health.serving import serve_until_signalled
    from stalwart.parallel.job_store import TCP_PORT, host_tcp_store, split_host_port

    host, port = split_host_port(args.bind, TCP_PORT)
    store = host_tcp_store(host, port)
    print(f"stalwart store: serving the job store on {host}:{store.port}", flush=True)
    return serve_until_signalled(lambda: None)
