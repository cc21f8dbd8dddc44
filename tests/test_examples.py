"""The example scripts run end to end in their fast modes (what a user copies must keep working)."""
from __future__ import annotations

import pytest
from cli_helpers import run_script


def test_steer_mixture_example(tmp_path):
    out = run_script("examples/steer_mixture.py", cwd=tmp_path)
    assert "steerflow default" in out


def test_steer_diffusers_example_on_a_tiny_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    run_script("examples/steer_diffusers.py", "--tiny", "--out", tmp_path / "out", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edit.png", "inpaint_flowchef.png",
                                                                    "inpaint_latent_default.png"]
