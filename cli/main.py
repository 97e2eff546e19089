"""``stalwart``: the command line, one module of :mod:`stalwart.cli` per subcommand.

Every error a user can fix is a :class:`~stalwart.errors.UserError`: printed as one line
(``stalwart CMD: error: ...``), exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from stalwart import __version__
from stalwart.cli.command import CommandLineError, CommandLineParser
from stalwart.errors import UserError

COMMANDS = ("train", "launch", "demo", "healthd", "controller", "store", "goodput", "ckpt")
# Services end cleanly (SIGTERM: they flush their events) when their launcher goes; everything else at once.
_SERVICES = ("healthd", "controller", "store")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="stalwart", description="Fault-tolerant distributed training for Llama-style LLMs.")
    parser.add_argument("--version", action="version", version=f"stalwart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stalwart.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except CommandLineError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    from stalwart.lifeline import bind_to_parent

    bind_to_parent(signal.SIGTERM if args.command in _SERVICES else signal.SIGKILL)  # nothing outlives its launcher
    try:
        if extra and not args.takes_overrides:
            raise UserError(f"unexpected arguments {' '.join(extra)}; see stalwart {args.command} --help")
        return args.runner(args, extra)
    except UserError as e:
        print(f"stalwart {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
