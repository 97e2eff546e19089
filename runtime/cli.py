"""``stalwart``: the command line. Subcommands import their machinery lazily (start-up is badput)."""

from __future__ import annotations

import argparse
import os
import sys

from stalwart import __version__


class UserError(Exception):
    """Raised for input the user can fix; printed as one line, exit code 2, no traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from stalwart.parallel.dims import ParallelLayoutError
    from stalwart.runtime.config import ConfigError

    return (UserError, ConfigError, ParallelLayoutError, FileNotFoundError)


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from stalwart.runtime.config import load_config
    from stalwart.runtime.train import plan_job

    cfg = load_config(args.config, overrides)
    if os.environ.get("STALWART_LAUNCHER"):
        from stalwart.runtime.launcher.worker import worker_main

        return worker_main(cfg)
    if _under_launcher() or args.nproc_per_node == 1:
        from stalwart.runtime.train import train

        train(cfg)
        return 0
    plan = plan_job(cfg, args.nproc_per_node)
    print(f"stalwart train: {args.nproc_per_node} ranks, layout {plan.dims.describe()}, run dir {cfg.run_dir}", flush=True)
    import math
    import time

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # On SIGTERM the agent forwards it to the ranks and waits this long before SIGKILL: longer than
    # the ranks' own preemption grace period, which they enforce themselves.
    shutdown = f"--shutdown-timeout={math.ceil(cfg.checkpoint.preemption_grace_s) + 15}"
    torchrun_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={args.nproc_per_node}", shutdown, "--module", "stalwart", "train", "--config", args.config, *overrides]
    )
    launched = time.time()
    try:
        run(torchrun_args)
    except SignalException as e:
        from stalwart.checkpoint.preemption import preempted_step

        step = preempted_step(cfg.run_dir, launched)
        if step is None:
            print(f"stalwart train: error: stopped by {e.sigval.name} before a checkpoint was committed on the way out; "
                  f"the previous committed step is intact (see the ranks' lines above)", file=sys.stderr)
            return 1
        print(f"stalwart train: stopped by {e.sigval.name}; step {step} is committed, rerun the same command to resume", flush=True)
        return 0
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        print(f"stalwart train: rank {first.local_rank} exited with code {first.exitcode}; see its log above", file=sys.stderr)
        return 1
    from stalwart.runtime.goodput.command import summarize_run

    print(summarize_run(cfg.run_dir), end="", flush=True)
    return 0


def cmd_healthd(args: argparse.Namespace, rest: list[str]) -> int:
    from stalwart.health.daemon import healthd_main

    return healthd_main(rest)


def cmd_controller(args: argparse.Namespace, rest: list[str]) -> int:
    from stalwart.health.controller import controller_main

    return controller_main(rest)


def cmd_launch(args: argparse.Namespace, rest: list[str]) -> int:
    from stalwart.runtime.launcher.main import launch_main

    return launch_main(rest)


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from stalwart.runtime.demo import demo_main

    return demo_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stalwart", description="Fault-tolerant distributed training for Llama-style LLMs.")
    parser.add_argument("--version", action="version", version=f"stalwart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model from a TOML config (one process, or --nproc-per-node ranks on this machine)",
        description="Train from a TOML config. Extra --section.key VALUE arguments override the config.",
    )
    train.add_argument("--config", required=True, help="TOML file, or a shipped config name (debug, 1B, 8B, ...)")
    train.add_argument("--nproc-per-node", type=int, default=1, help="ranks to start on this machine (default 1)")
    train.set_defaults(func=cmd_train)

    from stalwart.runtime.goodput.command import add_goodput_parser

    add_goodput_parser(sub)

    from stalwart.checkpoint.command import add_ckpt_parser

    add_ckpt_parser(sub)

    healthd = sub.add_parser("healthd", help="run the node health daemon (heartbeats, hang detection, GPU probes)", add_help=False)
    healthd.set_defaults(func=cmd_healthd)
    controller = sub.add_parser("controller", help="run the job controller (exclusions, stragglers, dashboard, /metrics)", add_help=False)
    controller.set_defaults(func=cmd_controller)
    demo = sub.add_parser("demo", help="the whole product on this machine: 2 nodes × 4 CPU ranks, health, dashboard, goodput (--chaos)", add_help=False)
    demo.set_defaults(func=cmd_demo)
    launch = sub.add_parser("launch", help="run the elastic agent of one node (torchrun-compatible flags; shrinks, grows, survives lost nodes)", add_help=False)
    launch.set_defaults(func=cmd_launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args, overrides)
    except _user_errors() as e:
        print(f"stalwart {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
