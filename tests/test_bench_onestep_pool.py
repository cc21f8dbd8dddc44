"""bench_onestep.py --pool: stored runs over disjoint seeds pool into one summary (pooled and per-seed statistics)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABEL = "N(0,I)→moons"
ROW = "some student"


def _run_file(path: Path, seeds: list[int], draws: int, offset: float) -> None:
    per_seed = [{"seed": s, "perfect_draws": [0.2 + 0.01 * k for k in range(draws)],
                 "rows": {ROW: {"stored_set": 0.3, "draws": [0.2 + 0.01 * k + offset + 0.001 * s for k in range(draws)],
                                "train_s": 1.0}}} for s in seeds]
    path.write_text(json.dumps({"problems": {LABEL: {"protocol": {"seeds": seeds, "draws": draws},
                                                     "per_seed": per_seed, "summary": {}, "commands": ["cmd"],
                                                     "seconds": 60.0}}}))


def _pool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_onestep.py"), "--pool", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_pool_concatenates_seeds_and_counts_each_model_once(tmp_path):
    _run_file(tmp_path / "a.json", [0, 1], 4, 0.02)
    _run_file(tmp_path / "b.json", [5], 4, 0.02)
    proc = _pool(str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "pooled"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "pooled.json").read_text())["problems"][LABEL]
    assert res["protocol"] == {"seeds": [0, 1, 5], "draws": 4} and res["commands"] == ["cmd", "cmd"]
    row = res["summary"]["rows"][ROW]
    # excess per draw: 0.02 + 0.001 · seed; 12 draws pooled, 3 models at the seed level
    assert row["excess"]["n"] == 12 and abs(row["excess"]["mean"] - (0.02 + 0.002)) < 1e-12
    per_model = [np.mean([0.2 + 0.01 * k + 0.02 + 0.001 * s for k in range(4)]) for s in (0, 1, 5)]
    assert row["seed_level"]["n"] == 3 and abs(row["seed_level"]["mean"] - np.mean(per_model)) < 1e-12
    assert abs(row["seed_level"]["se"] - np.std(per_model, ddof=1) / np.sqrt(3)) < 1e-12
    md = (tmp_path / "pooled.md").read_text()
    assert "| +0.020 / +0.021 / +0.025 |" in md and "12 draws" in md


def test_pool_refuses_repeated_seeds_and_mixed_protocols(tmp_path):
    _run_file(tmp_path / "a.json", [0, 1], 4, 0.0)
    _run_file(tmp_path / "b.json", [1], 4, 0.0)
    _run_file(tmp_path / "c.json", [7], 3, 0.0)
    proc = _pool(str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "x"))
    assert proc.returncode != 0 and "repeats seeds [1]" in proc.stderr
    proc = _pool(str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "y"))
    assert proc.returncode != 0 and "3 draws per seed" in proc.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_pooled_table_gives_a_row_from_fewer_seeds_its_own_counts(tmp_path):
    """A row trained only in some of the pooled runs is judged on its own seeds' draws and references."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_onestep

    partial = bench_onestep.matched_name(bench_onestep.STUDENTS["endpoint-nn"])
    for name, seeds, perfect, rows in (("a", [0, 1], 0.20, (ROW, partial)), ("b", [5], 0.30, (ROW,))):
        per_seed = [{"seed": s, "perfect_draws": [perfect + 0.01 * k for k in range(4)],
                     "rows": {r: {"stored_set": 0.3, "draws": [perfect + 0.01 * k + 0.02 for k in range(4)],
                                  "train_s": 1.0} for r in rows}} for s in seeds]
        (tmp_path / f"{name}.json").write_text(json.dumps({"problems": {LABEL: {
            "protocol": {"seeds": seeds, "draws": 4}, "per_seed": per_seed, "summary": {}, "commands": ["cmd"],
            "seconds": 1.0}}}))
    proc = _pool(str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "pooled"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "pooled.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {partial} |"))
    assert "(2 seeds)" in line and "(8) |" in line and line.endswith("| +0.020 / +0.020 / — |")
    full = next(ln for ln in md.splitlines() if ln.startswith(f"| {ROW} |"))
    assert "seeds)" not in full and "(12)" not in full
    verdict = next(ln for ln in md.splitlines() if ln.startswith(f"- `{partial}`"))
    # judged on its 8 draws (mean 0.235), against the perfect sampler of seeds 0 and 1 only (0.215, not 0.248)
    assert "on the 8 draws: 0.235" in verdict and "2 trained models" in verdict
    assert verdict.endswith("a perfect sampler scores 0.215 on the same references.")
