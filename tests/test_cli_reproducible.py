"""Same ``--seed``, same run: every command that trains (train, train --manifold, reflow, distill with each
student) gives bit-identical weights, samples and ``log.jsonl`` in two separate processes; a run killed
(SIGKILL) after a checkpoint and resumed with ``--resume`` ends with the weights and log of an uninterrupted
run; a fresh run refuses a folder that holds a run.

``log.jsonl`` carries two wall-clock fields, ``it_s`` and ``time``; they are the only keys left out of the
comparisons (:data:`WALL_CLOCK`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from cli_helpers import assert_one_line_error, run_cli
from steerflow.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
WALL_CLOCK = ("it_s", "time")
TINY = ["--model", "mlp", "--hidden", "16", "--batch", "32", "--quiet"]
PAIRS = ["--n-pairs", "64", "--pair-method", "euler", "--pair-steps", "4", "--batch", "16", "--quiet"]

# Runs every training command, then samples each result, in one process whose global RNG starts from the
# seed given on the command line (a caller's state must not leak into --seed runs).
DRIVER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from steerflow.cli.main import main

    out, state = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(state)
    rng = np.random.default_rng(0)
    pts = np.mod(np.array([1.0, 4.0]) + 0.3 * rng.standard_normal((40, 2)), 2 * np.pi).astype(np.float32)
    np.save(f"{out}/angles.npy", pts)
    np.savez(f"{out}/labelled.npz", x=rng.standard_normal((60, 2)).astype(np.float32), y=np.arange(60) % 3)
    lat, lon = rng.uniform(-60, 60, 40), rng.uniform(-180, 180, 40)
    with open(f"{out}/events.csv", "w") as f:
        f.write("latitude,longitude\\n" + "".join(f"{a:.4f},{b:.4f}\\n" for a, b in zip(lat, lon)))
    tiny = ["--model", "mlp", "--hidden", "16", "--batch", "32", "--quiet", "--seed", "0"]
    pairs = ["--n-pairs", "64", "--pair-method", "euler", "--pair-steps", "4", "--batch", "16", "--quiet",
             "--seed", "0", "--steps", "12", "--ckpt-every", "5"]
    student = ["--student-width", "16", "--student-depth", "2"]
    runs = {
        "flow": ["train", "--data", "moons", "--steps", "30", "--ckpt-every", "10", *tiny],
        "labelled": ["train", "--data", f"{out}/labelled.npz", "--steps", "20", "--ema", "0.9", *tiny],
        "torus": ["train", "--manifold", "torus2", "--data", f"{out}/angles.npy", "--steps", "10", "--hidden", "16",
                  "--batch", "16", "--quiet", "--seed", "0"],
        "sphere": ["train", "--manifold", "sphere2", "--data", f"{out}/events.csv", "--split", "train", "--steps",
                   "10", "--hidden", "16", "--batch", "16", "--quiet", "--seed", "0"],
        "reflow": ["reflow", "--ckpt", f"{out}/flow", "--iterations", "2", *pairs],
        "copy": ["distill", "--ckpt", f"{out}/reflow", *pairs],
        "mlp": ["distill", "--ckpt", f"{out}/flow", "--student", "mlp", *student, *pairs],
        "endpoint": ["distill", "--ckpt", f"{out}/flow", "--student", "mlp-endpoint", *student, "--match",
                     "ot-energy-full", "--match-memory", "2", "--warm-steps", "4", *pairs],
    }
    for name, argv in runs.items():
        assert main([*argv, "--out", f"{out}/{name}"]) == 0, name
        torch.randn(7)  # move the caller's RNG on between commands
    for name in runs:
        assert main(["sample", "--ckpt", f"{out}/{name}", "--n", "20", "--steps", "3", "--seed", "0",
                     "--out", f"{out}/{name}.npy"]) == 0, name
""")
RUNS = ("flow", "labelled", "torus", "sphere", "reflow", "copy", "mlp", "endpoint")


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "STEERFLOW_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STEERFLOW_DEBUG"):
        env.pop(var, None)
    return env


def _log(d: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in WALL_CLOCK}
            for ln in (d / "log.jsonl").read_text().splitlines()]


def _tensors(d: Path) -> dict:
    """The weights (and EMA weights) of the checkpoint ``latest.json`` points at."""
    step = json.loads((d / "latest.json").read_text())["checkpoint"]
    return {f"{p.stem}.{k}": v for p in sorted((d / step).glob("*.safetensors")) if p.stem in ("model", "ema")
            for k, v in load_file(str(p)).items()}


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for k in a:
        assert a[k].dtype == b[k].dtype and (a[k] == b[k]).all(), f"{what}: {k}"


def test_same_seed_is_bit_identical_across_processes(tmp_path):
    outs = []
    for state in (1, 2):  # two processes, callers with different RNG states
        d = tmp_path / f"p{state}"
        d.mkdir()
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(d), str(state)], env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(d)
    a, b = outs
    for name in RUNS:
        _assert_same_tensors(_tensors(a / name), _tensors(b / name), name)
        assert _log(a / name) == _log(b / name) and _log(a / name), name
        np.testing.assert_array_equal(np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy"), err_msg=name)
    assert "ema.net.0.weight" in _tensors(a / "flow")
    _assert_same_tensors(load_file(str(a / "reflow" / "pairs.safetensors")),
                         load_file(str(b / "reflow" / "pairs.safetensors")), "reflow pairs")
    assert [d["step"] for d in _log(a / "reflow")] == [5, 10, 12, 15, 20, 24]  # two rounds of 12 steps
    assert [d["step"] for d in _log(a / "endpoint")] == [4, 5, 10, 12]  # warm start (4), then matching


def _run_until_killed(argv: list[str], out: Path) -> int:
    """Start ``steerflow *argv`` in a subprocess, SIGKILL it once a checkpoint is written and the log has a
    line past it; return the step of that checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "steerflow", *argv], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
            try:
                step = json.loads((out / "latest.json").read_text())["step"]
                logged = max(json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines())
            except (OSError, ValueError, KeyError):  # nothing yet, or a line being written
                time.sleep(0.002)
                continue
            if logged > step:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return step
            time.sleep(0.002)
        raise AssertionError("no checkpoint within 300 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _resume_matches_uninterrupted(capsys, tmp_path, argv: list[str], total: int) -> None:
    part, full = tmp_path / "part", tmp_path / "full"
    step = _run_until_killed([*argv, "--out", str(part)], part)
    assert 0 < step < total
    assert max(d["step"] for d in _log(part)) > step  # lines past the checkpoint, to be cut back
    (part / ".tmp-step-00009999-killed").mkdir()  # what a checkpoint write killed half-way leaves
    rc, _, err = run_cli(capsys, *argv, "--out", part)  # without --resume: refused, nothing appended
    assert_one_line_error(rc, err, "--resume")
    run_json = (part / "run.json").read_text()
    rc, _, err = run_cli(capsys, *argv, "--out", part, "--resume", "--lr", "0.0123")  # other settings: refused
    assert_one_line_error(rc, err, "lr")
    assert (part / "run.json").read_text() == run_json
    rc, _, err = run_cli(capsys, *argv, "--out", part, "--resume")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *argv, "--out", full)
    assert rc == 0, err
    _assert_same_tensors(_tensors(part), _tensors(full), "resumed vs uninterrupted")
    assert _log(part) == _log(full)  # no duplicated lines: cut back to the checkpoint's step
    assert json.loads((part / "latest.json").read_text())["step"] == total
    assert not [p.name for p in part.iterdir() if p.name.startswith(".")]  # stale temporary folders removed


def test_killed_train_resumes_bit_exactly(capsys, tmp_path):
    argv = ["train", "--data", "moons", "--steps", "600", "--ckpt-every", "150", "--seed", "3", *TINY]
    _resume_matches_uninterrupted(capsys, tmp_path, argv, 600)


def test_killed_reflow_resumes_bit_exactly(capsys, trained_flow, tmp_path):
    argv = ["reflow", "--ckpt", str(trained_flow), "--iterations", "2", "--steps", "300", "--ckpt-every", "150",
            "--seed", "1", *PAIRS]
    _resume_matches_uninterrupted(capsys, tmp_path, argv, 600)


def test_killed_distill_resumes_bit_exactly(capsys, trained_flow, tmp_path):
    argv = ["distill", "--ckpt", str(trained_flow), "--student", "mlp", "--student-width", "16", "--student-depth",
            "2", "--match", "ot-energy-full", "--match-memory", "2", "--warm-steps", "50", "--steps", "400",
            "--ckpt-every", "150", "--seed", "2", *PAIRS]
    _resume_matches_uninterrupted(capsys, tmp_path, argv, 400)


@pytest.fixture(scope="module")
def trained_flow(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "flow"
    assert main(["train", "--data", "moons", "--steps", "20", "--out", str(d), *TINY]) == 0
    return d


def test_a_run_stopped_before_its_first_checkpoint_is_refused_then_started_over(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 100, "loss": 1.0, "lr": 0.001}\n')  # killed at step 150 of 1000
    argv = ["train", "--data", "moons", "--steps", "20", "--ckpt-every", "0", *TINY, "--out", out]
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, "log.jsonl", "--resume")
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # untouched
    rc, _, err = run_cli(capsys, *argv, "--resume")
    assert rc == 0, err
    assert [d["step"] for d in _log(out)] == [20]  # the old run's line is gone, the new run's only
    for cmd in (["reflow"], ["distill"]):
        rc, _, err = run_cli(capsys, *cmd, "--ckpt", out, "--out", out, "--steps", 2, *PAIRS)
        assert_one_line_error(rc, err, "--resume")
