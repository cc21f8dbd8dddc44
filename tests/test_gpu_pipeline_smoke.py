"""The prepared GPU pipeline benchmark stays runnable: its CPU smoke mode (tiny SD3 / Flux configs) completes
every section. The real figures (SD3-medium / Flux-dev sizes, 1024², bf16) need a CUDA device."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_pipeline_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_pipeline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_pipeline.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for kind in ("sd3", "flux"):
        r = result["models"][kind]
        for section in ("pipeline_call", "unguided", "flowchef", "dps"):
            assert "error" not in r[section], (kind, section, r[section])
            assert r[section]["seconds"] > 0
        # the steerflow loop and the pipeline's own loop ran the same transformer on the same grid
        assert 0.2 < r["loop_overhead_steerflow_over_pipeline"] < 5
