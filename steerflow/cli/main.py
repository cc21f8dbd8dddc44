"""``steerflow`` command line: one parser, subcommands registered by their modules.

A subcommand is a :class:`Command` (name, one-line help, a ``configure(parser)`` that adds its
arguments, and a ``run(args) -> int`` that does the work). Modules add theirs with :func:`register` at
import time::

    # steerflow/cli/steer.py
    from .main import Command, register
    register(Command("steer", "sample with a steering method", configure=_configure, run=_run))

:func:`main` imports the command modules (:data:`BUILTIN_MODULES`); heavy optional libraries (diffusers, POT,
Pillow) are imported only inside the commands that use them, with a message naming the extra to install.

Errors: bad user input (unknown dataset, wrong shapes, a missing/corrupt/mismatched checkpoint, a bad
number) ends with one line on stderr, ``steerflow: error: <what was expected, what arrived>``, and exit
code 2 — no traceback. Set ``STEERFLOW_DEBUG=1`` to re-raise instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["Command", "COMMANDS", "register", "CLIError", "build_parser", "main"]

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


class CLIError(Exception):
    """A user-facing error: printed as one line ``steerflow: error: <message>``, exit code 2."""


@dataclass(frozen=True)
class Command:
    """A subcommand: ``configure`` adds its arguments to its parser, ``run`` executes it (returns an exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


COMMANDS: dict[str, Command] = {}
"""Registered subcommands in registration order (the order ``steerflow --help`` lists them)."""

BUILTIN_MODULES = ("train", "sample", "straighten", "evaluate", "plot", "steer", "demo")
"""Command modules of :mod:`steerflow.cli` (each registers its commands on import)."""


def register(command: Command) -> Command:
    """Add ``command`` to :data:`COMMANDS` (re-registering a name replaces it)."""
    if not isinstance(command, Command):
        raise TypeError(f"register expects a Command, got {type(command).__name__}")
    COMMANDS[command.name] = command
    return command


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``steerflow: error: <sub>: <message> (see --help)``, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self._fail(self.prog.split(" ", 1)[1] if " " in self.prog else "", message)

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown flags from the top-level parser, which would point the user
        # at 'steerflow --help'; name the subcommand (and its --help) instead
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self._fail(getattr(ns, "_command", ""), f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _fail(self, sub: str, message: str):
        where, hint = (f"{sub}: ", f"steerflow {sub} --help") if sub else ("", "steerflow --help")
        self.exit(EXIT_USAGE, f"steerflow: error: {where}{message} (see '{hint}')\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show ``(default: X)`` only where there is a meaningful default (not None/False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _load_commands() -> None:
    """Import the command modules (each registers its commands)."""
    for name in BUILTIN_MODULES:
        importlib.import_module(f"steerflow.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    from .. import __version__

    _load_commands()
    parser = _Parser(prog="steerflow", formatter_class=_Formatter,
                     description="Train, straighten, sample, evaluate and steer flow-matching models.\n"
                                 "Start with:  steerflow demo --quick")
    parser.add_argument("--version", action="version", version=f"steerflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help,
                           formatter_class=_Formatter)
        cmd.configure(p)
        if "--threads" not in p._option_string_actions:
            p.add_argument("--threads", type=int, default=None,
                           help="torch CPU threads (default: $STEERFLOW_THREADS, else 1 — one thread is fastest "
                                "for small networks and avoids oversubscription on a busy machine)")
        p.set_defaults(_command=cmd.name)
    return parser


def _set_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from ``--threads`` / ``$STEERFLOW_THREADS`` (default 1)."""
    import torch

    n = getattr(args, "threads", None)
    if n is None:
        env = os.environ.get("STEERFLOW_THREADS", "1")
        try:
            n = int(env)
        except ValueError:
            raise CLIError(f"STEERFLOW_THREADS must be a positive integer, got {env!r}") from None
    if n < 1:
        raise CLIError(f"--threads must be a positive integer, got {n}")
    torch.set_num_threads(n)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]
    return " ".join(msg.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``steerflow`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error already printed (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if getattr(args, "_command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(os.environ.get("STEERFLOW_DEBUG"))
    try:
        _set_threads(args)
        rc = COMMANDS[args._command].run(args)
    except KeyboardInterrupt:
        print("steerflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ValueError, TypeError, OSError, KeyError, FloatingPointError, ImportError) as e:
        if debug:
            raise
        print(f"steerflow: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if rc is None else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
