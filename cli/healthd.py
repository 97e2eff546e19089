"""``stalwart healthd --run-dir R --bind ADDR --token-file F``: the node health daemon, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os

from stalwart.cli.command import Subparsers, subcommand
from stalwart.errors import UserError
from stalwart.jobenv import CONTROLLER_ENV, node_name


def register(sub: Subparsers) -> None:
    from stalwart.health.hang import HangConfig, Phase

    p = subcommand(
        sub,
        "healthd",
        run=run,
        help="run the node health daemon (heartbeats, hang detection, GPU probes)",
        description="Per-node health daemon: heartbeats, hang detection, GPU probes.",
    )
    p.add_argument("--run-dir", required=True, help="the job's run directory (events/, health/)")
    p.add_argument("--bind", default="127.0.0.1:0", help="host:port (port 0 picks one) or unix:PATH")
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the job token that KillWorkers must present (default $STALWART_TOKEN_FILE)",
    )
    p.add_argument(
        "--node",
        default=node_name(),
        help="this node's name, as the launcher's --node-id (default $STALWART_NODE_ID, else $GROUP_RANK or 0)",
    )
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--safety-factor", type=float, default=5.0)
    p.add_argument("--floor-s", type=float, default=2.0, help="smallest adaptive hang limit in seconds")
    for phase in Phase:
        p.add_argument(
            f"--{phase.value.lower()}-limit-s",
            type=float,
            default=HangConfig().initial_limits[phase],
            help=f"warm-up limit for {phase.value}",
        )
    p.add_argument(
        "--hang-kill",
        choices=("group", "culprit"),
        default="group",
        help="on a hang, kill the node's whole worker group (default) or only the stopped rank "
        "(under in-process recovery the others re-form and the rank is replaced)",
    )
    p.add_argument("--probe-interval-s", type=float, default=1.0)
    p.add_argument("--expected-gpus", type=int, default=None, help="fewer GPUs than this marks the node unhealthy")
    p.add_argument(
        "--worker-ancestor", type=int, default=None, help="only descendants of this pid may register as workers"
    )
    p.add_argument(
        "--controller",
        default=os.environ.get(CONTROLLER_ENV),
        help="job controller host:port to report to (default $STALWART_CONTROLLER)",
    )
    p.add_argument(
        "--report-interval-s", type=float, default=1.0, help="seconds between status reports to the controller"
    )
    p.add_argument("--controller-ca", help="PEM CA that signed the controller's certificate (TLS to the controller)")
    p.add_argument("--controller-cert", help="PEM client certificate for mutual TLS to the controller")
    p.add_argument("--controller-key", help="PEM private key of --controller-cert")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from stalwart.health.daemon import HealthDaemon
    from stalwart.health.hang import HangConfig, Phase
    from stalwart.health.security import TlsConfig, read_token
    from stalwart.health.serving import serve_until_signalled

    logging.basicConfig(level=logging.INFO, format="%(asctime)s healthd %(levelname)s %(message)s")
    token = read_token(args.token_file)
    try:
        controller_tls = TlsConfig.from_paths(
            args.controller_cert, args.controller_key, args.controller_ca, server=False
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    config = HangConfig(
        warmup_steps=args.warmup_steps,
        safety_factor=args.safety_factor,
        floor_s=args.floor_s,
        initial_limits={p: getattr(args, f"{p.value.lower()}_limit_s") for p in Phase},
    )
    daemon = HealthDaemon(
        args.run_dir,
        token,
        bind=args.bind,
        node=args.node,
        hang_config=config,
        probe_interval_s=args.probe_interval_s,
        expected_gpus=args.expected_gpus,
        hang_kill=args.hang_kill,
        worker_ancestor=args.worker_ancestor,
        controller=args.controller,
        controller_tls=controller_tls,
        report_interval_s=args.report_interval_s,
    )
    try:
        address = daemon.start()
    except OSError as e:
        raise UserError(str(e)) from None
    print(f"healthd node {args.node} listening on {address}", flush=True)
    return serve_until_signalled(daemon.stop)
