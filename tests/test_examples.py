"""The example scripts run end to end in their fast modes (what a user copies must keep working)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import ROOT, run_script


def test_steer_mixture_example(tmp_path):
    out = run_script("examples/steer_mixture.py", cwd=tmp_path)
    assert "steerflow default" in out


def test_steer_diffusers_example_on_a_tiny_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    run_script("examples/steer_diffusers.py", "--tiny", "--out", tmp_path / "out", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edit.png", "inpaint_flowchef.png",
                                                                    "inpaint_latent_default.png"]


def test_train_and_sample_example(tmp_path):
    run_script("examples/train_and_sample.py", "--fast", "--out", tmp_path / "out", cwd=tmp_path)
    out = tmp_path / "out"
    assert (out / "samples.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 150  # the reloaded checkpoint is the run's last step
    assert len(results["energy_distance"]) == 4
    assert all(math.isfinite(s) and s >= 0 for s in results["energy_distance"].values())


def test_straighten_example(tmp_path):
    run_script("examples/straighten_one_step.py", "--fast", "--out", tmp_path / "out", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "one_step.png").stat().st_size > 0
    assert set(results["energy_distance"]) == {"1-RF", "2-RF", "distilled"}
    # reflow straightens: the 2-rectified flow's paths are straighter than those of the flow it came from
    assert results["straightness"]["2-RF"] < results["straightness"]["1-RF"]


def test_sphere_example(tmp_path):
    run_script("examples/sphere_flow.py", "--fast", "--out", tmp_path / "out", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "map.png").stat().st_size > 0
    assert results["max_off_sphere"] < 1e-5  # geometry=S2 keeps every sample on the sphere
    assert results["test_points"] == 82      # 10% of the 827 eruptions, held out
    assert math.isfinite(results["test_nll"])


def test_every_example_script_is_run_here():
    here = Path(__file__).read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert scripts, "no example scripts found"
    for name in scripts:
        assert f'"examples/{name}"' in here, f"examples/{name} has no test in tests/test_examples.py"
