"""The ``steerflow`` command line (argparse lives here and nowhere else in the package).

Subcommands register themselves into :data:`~steerflow.cli.main.COMMANDS` (see :mod:`steerflow.cli.main`).
"""
from .main import COMMANDS, CLIError, Command, build_parser, main, register

__all__ = ["COMMANDS", "CLIError", "Command", "build_parser", "main", "register"]
