"""An mkdocs hook: ``<!-- steerflow-help: CMD -->`` in a page becomes the current ``steerflow CMD --help`` text.

The command-line page is then generated from the parser itself at every build, so it cannot drift from the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re

_MARKER = re.compile(r"^<!-- steerflow-help: ([a-z-]+) -->$", re.M)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_text(command: str) -> str:
    """``steerflow COMMAND --help`` as the terminal shows it, wrapped at 100 columns."""
    from steerflow.cli.main import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width it reads from here
    commands = _subcommands(build_parser())
    if command not in commands:
        raise ValueError(f"docs ask for `steerflow {command} --help`, but the CLI has no command {command!r}; "
                         f"it has {sorted(commands)}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        commands[command].print_help()
    return out.getvalue().rstrip()


def on_page_markdown(markdown: str, **kwargs) -> str:
    def block(match: re.Match) -> str:
        return f"{match.group(0)}\n```text\n{help_text(match.group(1))}\n```"

    return _MARKER.sub(block, markdown)
