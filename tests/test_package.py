"""The package's lazy attributes: every subpackage is reachable as ``steerflow.<name>`` after a bare
``import steerflow`` (checked in a fresh interpreter, where no other import has set the attribute first)."""
import subprocess
import sys
from pathlib import Path

import pytest

import steerflow

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_a_lazy_attribute():
    names = sorted(p.parent.name for p in (ROOT / "steerflow").glob("*/__init__.py")) + ["plotting"]
    assert {"straighten", "transport", "training", "cli"} <= set(names)
    code = ("import importlib, steerflow\n"
            f"for name in {names!r}:\n"
            "    assert getattr(steerflow, name) is importlib.import_module('steerflow.' + name), name\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        steerflow.nosuch
