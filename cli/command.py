"""The one way to define a ``stalwart`` subcommand.

Each module of :mod:`stalwart.cli` has a ``register(sub)`` that calls :func:`subcommand` (once per
command, or once per action of a command with actions) and a runner ``run(args, extra) -> int``.
``extra`` holds the arguments argparse did not know; only commands that take config overrides
(``--section.key VALUE``) accept them. Runners import their machinery lazily: start-up is badput.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from stalwart.errors import UserError

Runner = Callable[[argparse.Namespace, list[str]], int]
Subparsers = argparse._SubParsersAction


class CommandLineError(UserError):
    """A flag argparse refused (missing, unknown choice, wrong type); ``prog`` is the command it belongs to."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one :class:`CommandLineError` line, not usage text and ``exit(2)``.

    Subcommand parsers inherit the class (``add_subparsers`` uses the parent's type), so every flag of
    every command fails the same way as bad config values do.
    """

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(self.prog, f"{message}; see {self.prog} --help")


def whole_number(low: int, high: int, example: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], or one line saying which and giving ``example``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use e.g. {example}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low} and at most {high}")
        return value

    parse.__name__ = "whole number"  # what argparse calls the type in its messages
    return parse


def subcommand(
    sub: Subparsers,
    name: str,
    *,
    help: str,
    run: Runner,
    description: str | None = None,
    overrides: bool = False,
    **kwargs: object,
) -> argparse.ArgumentParser:
    """Add ``name`` to ``sub``; ``overrides`` lets it take trailing ``--section.key VALUE`` arguments."""
    parser = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".", **kwargs)
    parser.set_defaults(runner=run, takes_overrides=overrides)
    return parser


def actions(parser: argparse.ArgumentParser, dest: str) -> Subparsers:
    """Sub-actions of a command (``stalwart ckpt ls``); each is then defined with :func:`subcommand`."""
    return parser.add_subparsers(dest=dest, metavar="ACTION", required=True)
