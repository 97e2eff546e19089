"""``stalwart train --config C [--nproc-per-node N] [--section.key VALUE ...]``.

One process trains in place; ``--nproc-per-node N`` starts N ranks on this machine through
torch's elastic launcher (what ``torchrun --standalone`` does) and ends with the goodput report.
Under ``torchrun`` or ``stalwart launch`` each rank runs this same command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING

from stalwart.cli.command import Subparsers, subcommand, whole_number
from stalwart.jobenv import LAUNCHER_ENV, WARM_SPARE_ENV

if TYPE_CHECKING:
    from stalwart.runtime.config import Config
    from stalwart.runtime.plan import JobPlan


MAX_RANKS_PER_NODE = 1024
positive_int = whole_number(1, MAX_RANKS_PER_NODE, example=4)
"""``--nproc-per-node``: ranks on this machine, 1 to MAX_RANKS_PER_NODE."""


def register(sub: Subparsers) -> None:
    p = subcommand(
        sub,
        "train",
        run=run,
        overrides=True,
        help="train a model from a TOML config (one process, or --nproc-per-node ranks on this machine)",
        description="Train from a TOML config. Extra --section.key VALUE arguments override the config.",
    )
    p.add_argument("--config", required=True, help="TOML file, or a shipped config name (debug, 1B, 8B, ...)")
    p.add_argument("--nproc-per-node", type=positive_int, default=1, help="ranks to start on this machine (default 1)")


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def check_train(args: argparse.Namespace, overrides: list[str]) -> tuple[Config, JobPlan]:
    """The config and the job plan ``stalwart train`` would run, every check done; one UserError otherwise.

    Torch-free and side-effect free: the same path runs before any rank starts, and in-process in tests.
    """
    from stalwart.runtime.config import load_config
    from stalwart.runtime.plan import plan_job

    cfg = load_config(args.config, overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if _under_launcher() else args.nproc_per_node
    return cfg, plan_job(cfg, world_size)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from stalwart.runtime.config import load_config

    if os.environ.get(WARM_SPARE_ENV) or os.environ.get(LAUNCHER_ENV):  # the launcher checked the plan already
        cfg = load_config(args.config, overrides)
    else:
        from stalwart.runtime.plan import check_run_directory

        cfg, plan = check_train(args, overrides)
        check_run_directory(cfg, plan)  # the run directory's checkpoints are of this model, before anything starts
    if os.environ.get(WARM_SPARE_ENV):
        from stalwart.launcher.worker import warm_spare_main

        return warm_spare_main(cfg)
    if os.environ.get(LAUNCHER_ENV):
        from stalwart.launcher.worker import worker_main

        return worker_main(cfg)
    if _under_launcher() or args.nproc_per_node == 1:
        from stalwart.runtime.train import train

        if not _under_launcher():  # a lone process is its own job: refuse before building anything
            from stalwart.checkpoint.lease import job_id

            refuse_a_second_job(cfg, job_id({}))  # this process
        train(cfg)
        if _under_launcher():
            from stalwart.launcher.worker import leave

            leave(0)
        return 0
    refuse_a_second_job(cfg, f"train:{uuid.uuid4().hex}")  # a new job: any live holder is another one
    print(
        f"stalwart train: {args.nproc_per_node} ranks, layout {plan.dims.describe()}, run dir {cfg.run_dir}", flush=True
    )
    return _run_ranks(args, overrides, cfg)


def refuse_a_second_job(cfg: Config, job: str) -> None:
    """Refuse at once (one line) if a live job other than ``job`` holds the run; rank 0 takes the lease later."""
    from stalwart.checkpoint.lease import refuse_if_held
    from stalwart.checkpoint.storage import s3_storage_options

    if cfg.checkpoint.enabled:
        c = cfg.checkpoint
        refuse_if_held(cfg.checkpoint_url, s3_storage_options(c.s3_endpoint, c.s3_max_attempts), job)


def _run_ranks(args: argparse.Namespace, overrides: list[str], cfg: Config) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    # On SIGTERM the agent forwards it to the ranks and waits this long before SIGKILL: longer than
    # the ranks' own preemption grace period, which they enforce themselves.
    shutdown = f"--shutdown-timeout={math.ceil(cfg.checkpoint.preemption_grace_s) + 15}"
    torchrun_args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={args.nproc_per_node}",
            shutdown,
            "--module",
            "stalwart",
            "train",
            "--config",
            args.config,
            *overrides,
        ]
    )
    launched = time.time()
    try:
        torchrun(torchrun_args)
    except SignalException as e:
        from stalwart.checkpoint.preemption import preempted_step

        step = preempted_step(cfg.run_dir, launched)
        if step is None:
            print(
                f"stalwart train: error: stopped by {e.sigval.name} before a checkpoint was committed on the way out; "
                "the previous committed step is intact (see the ranks' lines above)",
                file=sys.stderr,
            )
            return 1
        print(
            f"stalwart train: stopped by {e.sigval.name}; step {step} is committed, rerun the same command to resume",
            flush=True,
        )
        return 0
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        print(
            f"stalwart train: rank {first.local_rank} exited with code {first.exitcode}; see its log above",
            file=sys.stderr,
        )
        return 1
    from stalwart.cli.goodput import summarize_run

    print(summarize_run(cfg.run_dir), end="", flush=True)
    return 0
