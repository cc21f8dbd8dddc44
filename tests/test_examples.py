"""The example scripts run end to end in their fast modes (what a user copies must keep working)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_steer_mixture_example(tmp_path):
    out = _run([ROOT / "examples" / "steer_mixture.py"], tmp_path)
    assert "steerflow default" in out


def test_steer_diffusers_example_on_a_tiny_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    _run([ROOT / "examples" / "steer_diffusers.py", "--tiny", "--out", tmp_path / "out"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edit.png", "inpaint_flowchef.png",
                                                                    "inpaint_latent_default.png"]
