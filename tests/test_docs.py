"""The documentation site: every tutorial's code runs as written, and the site builds with no warnings.

The Python blocks of each page in ``docs/tutorials/`` run in order, in one fresh namespace per page, in a temporary
directory (what a reader pasting them into a session would see). The strict build needs mkdocs (``pip install
'steerflow[docs]'``, which CI installs); without it that test is skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerflow.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# pages whose code needs an optional extra, and the modules that extra provides
_NEEDS = {"diffusers.md": ("diffusers", "transformers")}


def python_blocks(page: Path) -> list[str]:
    """The ```python fenced blocks of a Markdown page, in order."""
    return _PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


def test_the_tutorials_are_found_and_each_has_code():
    assert len(TUTORIALS) >= 6
    for page in TUTORIALS:
        assert python_blocks(page), f"{page.name} has no ```python block"


def test_every_tutorial_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in TUTORIALS:
        assert f"tutorials/{page.name}" in nav, f"{page.name} is missing from mkdocs.yml's nav"


@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_code_runs(page, tmp_path, monkeypatch):
    for module in _NEEDS.get(page.name, ()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace = {"__name__": "__main__"}
    try:
        with torch.random.fork_rng(devices=[]):  # the pages seed torch's global RNG; the suite's state is kept
            for i, code in enumerate(python_blocks(page)):
                exec(compile(code, f"{page.relative_to(ROOT)} (python block {i + 1})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_every_public_subpackage_has_an_api_page():
    import steerflow

    public = [name for name in steerflow._SUBPACKAGES if name not in ("cli", "plotting")]
    assert "steering" in public
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name in public:
        page = DOCS / "api" / f"{name}.md"
        assert page.is_file(), f"no API page docs/api/{name}.md"
        assert f"::: steerflow.{name}\n" in page.read_text(encoding="utf-8"), f"{page.name} does not render the package"
        assert f"api/{name}.md" in nav, f"api/{name}.md is missing from mkdocs.yml's nav"


def test_the_cli_page_covers_every_command():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands = {c for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices}
    for command in commands:
        assert f"<!-- steerflow-help: {command} -->" in text, f"docs/cli.md does not show `steerflow {command} --help`"


def test_the_cli_page_commands_parse():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "docs/cli.md has no ```bash block"
    lines = [ln.split("#", 1)[0].strip() for ln in block.group(1).replace("\\\n", " ").splitlines()]
    commands = [ln for ln in lines if ln]
    assert len(commands) >= 10
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "steerflow", command
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"docs/cli.md command does not parse (exit {e.code}): {command}")


@pytest.mark.slow
def test_the_site_builds_without_warnings(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip("mkdocs / mkdocstrings are not installed (pip install 'steerflow[docs]'); CI installs them")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "steering" / "index.html").is_file()
