"""Every command line in the README's "Command line" block parses: its subcommand and flags exist and take the
values shown (the commands are parsed, not run)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from steerflow.cli.main import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Command line\s+```bash\n(.*?)```", text, re.S)
    assert block, "the README has no ```bash block under '## Command line'"
    joined = block.group(1).replace("\\\n", " ")  # continuation lines
    commands = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert line.startswith("steerflow "), f"not a steerflow command: {line!r}"
            commands.append(line)
    return commands


COMMANDS = _readme_commands()


def test_the_block_holds_every_subcommand_the_readme_teaches():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert {"train", "sample", "eval", "reflow", "distill", "plot", "steer", "invert", "edit"} <= used


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's one-line error: report the command that broke
        pytest.fail(f"README command does not parse (exit {e.code}): {command}")
    assert args._command == argv[0]
