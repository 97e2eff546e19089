"""``stalwart controller --run-dir R --grpc-bind H:P --http-bind H:P --token-file F``: the job controller.

It serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stalwart.cli.command import Subparsers, subcommand
from stalwart.errors import UserError


def register(sub: Subparsers) -> None:
    p = subcommand(
        sub,
        "controller",
        run=run,
        help="run the job controller (exclusions, stragglers, dashboard, /metrics)",
        description="Job controller: node and rank aggregation, exclusions, dashboard, /metrics.",
    )
    p.add_argument(
        "--run-dir", required=True, help="the job's run directory (events/, excluded_nodes.json, checkpoints/)"
    )
    p.add_argument(
        "--grpc-bind",
        default="127.0.0.1:50052",
        help="host:port for the gRPC API (default loopback; give the cluster interface)",
    )
    p.add_argument(
        "--http-bind", default="127.0.0.1:8080", help="host:port for the dashboard, /api/state, /metrics and /healthz"
    )
    p.add_argument("--token-file", default=None, help="file holding the job token (default $STALWART_TOKEN_FILE)")
    p.add_argument("--tls-cert", help="PEM server certificate (enables TLS on both servers)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    p.add_argument(
        "--checkpoint-url",
        default=None,
        help="checkpoint root (default: from the job's config, else RUN_DIR/checkpoints)",
    )
    p.add_argument(
        "--straggler-strikes", type=int, default=3, help="exclude a node after this many straggler strikes (0: never)"
    )
    p.add_argument(
        "--network-strikes", type=int, default=3, help="exclude a node after this many network faults (0: never)"
    )
    p.add_argument(
        "--straggler-threshold",
        type=float,
        default=1.5,
        help="a rank this many times slower than the others' median is a straggler",
    )
    p.add_argument("--straggler-window", type=int, default=20, help="steps per rank the straggler score looks at")
    p.add_argument(
        "--refresh-interval-s", type=float, default=3.0, help="how often goodput, incidents and checkpoints are re-read"
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from stalwart.health.controller import ControllerConfig, JobController
    from stalwart.health.exclusion import ExclusionPolicy
    from stalwart.health.security import TlsConfig, read_token
    from stalwart.health.serving import serve_until_signalled
    from stalwart.health.straggler import StragglerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s controller %(levelname)s %(message)s")
    token = read_token(args.token_file)
    try:
        config = ControllerConfig(
            Path(args.run_dir),
            args.grpc_bind,
            args.http_bind,
            tls=TlsConfig.from_paths(args.tls_cert, args.tls_key, args.tls_ca, server=True),
            policy=ExclusionPolicy(args.straggler_strikes, args.network_strikes),
            straggler=StragglerConfig(
                window=args.straggler_window,
                min_samples=min(5, args.straggler_window),
                threshold=args.straggler_threshold,
            ),
            checkpoint_url=args.checkpoint_url,
            refresh_interval_s=args.refresh_interval_s,
        )
        controller = JobController(config, token)
        controller.start()
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print(f"controller listening on {controller.grpc_address} (gRPC) and {controller.http_address} (HTTP)", flush=True)
    return serve_until_signalled(controller.stop)
