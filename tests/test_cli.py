"""The ``steerflow`` command line: help, a train → sample → eval → plot → reflow → distill round trip,
one-line errors with exit code 2, and the quick demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from steerflow.cli.main import COMMANDS, build_parser, main



TINY = ["--model", "mlp-selu", "--hidden", "16", "--batch", "64", "--quiet"]


def test_every_subcommand_has_help(capsys):
    build_parser()
    expected = {"train", "sample", "reflow", "distill", "eval", "plot", "demo"}
    assert expected <= set(COMMANDS)
    for name in COMMANDS:
        rc, out, _ = run_cli(capsys, name, "--help")
        assert rc == 0 and out.startswith(f"usage: steerflow {name}"), name
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and all(name in out for name in expected)
    rc, _, err = run_cli(capsys)
    assert rc == 2 and "usage" in err


def test_every_training_command_checkpoints_and_resumes(capsys):
    """train, reflow and distill write a checkpoint every --ckpt-every steps (1000 by default) and take --resume."""
    for name in ("train", "reflow", "distill"):
        rc, out, _ = run_cli(capsys, name, "--help")
        flat = " ".join(out.split())
        assert rc == 0 and "--ckpt-every N" in flat and "(default: 1000)" in flat and "--resume" in flat, name
        args = build_parser().parse_args([name, "--ckpt", "x"] if name != "train" else [name])
        assert (args.ckpt_every, args.resume) == (1000, False), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 1-RF checkpoint (a few steps): enough to exercise every command."""
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "moons", "--steps", "40", "--out", str(d), *TINY]) == 0
    return d


def test_train_sample_eval_plot_round_trip(capsys, trained, tmp_path):
    assert (trained / "latest.json").is_file() and (trained / "run.json").is_file()
    info = json.loads((trained / "run.json").read_text())
    assert info["data"] == "moons" and info["coupling"] == "independent"

    out = tmp_path / "s.npy"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", trained, "--n", 50, "--steps", 4, "--method", "heun",
                         "--out", out)
    assert rc == 0, err
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all()
    rc, _, _ = run_cli(capsys, "sample", "--ckpt", trained, "--n", 50, "--steps", 4, "--method", "heun",
                       "--out", tmp_path / "s2.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "s2.npy"), x)  # same seed, same samples
    rc, _, _ = run_cli(capsys, "sample", "--ckpt", trained, "--n", 20, "--steps", 4, "--grid", "shifted",
                       "--out", tmp_path / "s3.npy")
    assert rc == 0 and np.load(tmp_path / "s3.npy").shape == (20, 2)

    rc, out_text, err = run_cli(capsys, "eval", "--ckpt", trained, "--nfe", "1", "4", "--n", 100,
                                "--out", tmp_path / "e.json")
    assert rc == 0, err
    assert "W2" in out_text and "NFE 4" in out_text
    res = json.loads((tmp_path / "e.json").read_text())
    assert [s["setting"] for s in res["scores"]] == ["1", "4"]
    assert [s["nfe"] for s in res["scores"]] == [1, 4]
    assert all(s["w2"] > 0 and np.isfinite(s["energy"]) for s in res["scores"])

    for argv in (["--samples", tmp_path / "s.npy", "--data", "moons"], ["--ckpt", trained, "--n", 100],
                 ["--ckpt", trained, "--kind", "trajectories", "--n", 30]):
        png = tmp_path / "p.png"
        rc, _, err = run_cli(capsys, "plot", *argv, "--out", png)
        assert rc == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()


def test_reflow_then_distill(capsys, trained, tmp_path):
    rf, ds = tmp_path / "2rf", tmp_path / "1step"
    common = ["--n-pairs", 128, "--pair-method", "euler", "--pair-steps", 4, "--steps", 10, "--batch", 32, "--quiet"]
    rc, _, err = run_cli(capsys, "reflow", "--ckpt", trained, "--out", rf, *common)
    assert rc == 0, err
    assert json.loads((rf / "run.json").read_text())["k"] == 2
    assert (rf / "pairs.safetensors").is_file()
    rc, _, err = run_cli(capsys, "distill", "--ckpt", rf, "--out", ds, *common)
    assert rc == 0, err
    assert "128 pairs" in err  # new pairs from the 2-RF
    rc, _, err = run_cli(capsys, "distill", "--ckpt", rf, "--out", tmp_path / "1step-b", "--pairs",
                         rf / "pairs.safetensors", "--steps", 5, "--quiet")
    assert rc == 0 and "128 pairs" in err  # the reflow run's own pair file
    rc, _, err = run_cli(capsys, "distill", "--ckpt", rf, "--out", tmp_path / "1step-c", "--pairs",
                         tmp_path / "none.safetensors")
    assert_one_line_error(rc, err, "--pairs")
    info = json.loads((ds / "run.json").read_text())
    assert info["kind"] == "distilled" and info["default_steps"] == 1
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ds, "--n", 10, "--out", tmp_path / "d.npy")
    assert rc == 0 and np.load(tmp_path / "d.npy").shape == (10, 2)


def test_distill_with_distribution_matching(capsys, trained, tmp_path):
    """--match trains the one-step map against fresh data batches of the teacher's dataset (or --data)."""
    common = ["--n-pairs", 64, "--pair-method", "euler", "--pair-steps", 4, "--steps", 6, "--batch", 16, "--quiet"]
    out = tmp_path / "matched"
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", out, "--match", "ot-energy", *common)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["kind"] == "distilled"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", out, "--n", 10, "--out", tmp_path / "m.npy")
    assert rc == 0 and np.load(tmp_path / "m.npy").shape == (10, 2)
    # ot-energy-full / ot-energy-nn: --batch is the data batch, two generated batches of it per step
    for match in ("ot-energy-full", "ot-energy-nn"):
        rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / match, "--match", match, *common)
        assert rc == 0, err
        cfg = json.loads(next((tmp_path / match).glob("step-*/config.json")).read_text())["training"]
        assert (cfg["batch_size"], cfg["match_batch_size"], cfg["match"]) == (32, 16, match)
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / "m2", "--match", "energy",
                         "--data", "digits", *common)
    assert_one_line_error(rc, err, "shape")
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / "m3", "--data", "moons", *common)
    assert_one_line_error(rc, err, "--match")
    # --sliced-weight: recorded with its memory; without --match it is a one-line error
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / "sliced", "--match", "ot-energy-nn",
                         "--sliced-weight", 0.5, "--sliced-memory", 3, *common)
    assert rc == 0, err
    cfg = json.loads(next((tmp_path / "sliced").glob("step-*/config.json")).read_text())["training"]
    assert (cfg["sliced_weight"], cfg["sliced_memory"], cfg["match"]) == (0.5, 3, "ot-energy-nn")
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / "m4", "--sliced-weight", 1, *common)
    assert_one_line_error(rc, err, "--sliced-weight")


def test_distill_into_a_fresh_end_point_student(capsys, trained, tmp_path):
    """--student mlp-endpoint --warm-steps: regression warm start, then matching; the checkpoint rebuilds the
    end-point network, whose one-step samples are its bounded output."""
    common = ["--n-pairs", 64, "--pair-method", "euler", "--pair-steps", 4, "--steps", 8, "--batch", 16, "--quiet"]
    out = tmp_path / "endpoint"
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", out, "--match", "ot-energy-full",
                         "--student", "mlp-endpoint", "--student-width", 32, "--student-depth", 2, "--student-bounded",
                         "--warm-steps", 3, "--match-memory", 2, *common)
    assert rc == 0, err
    step_dir = next(out.glob("step-*"))
    cfg = json.loads((step_dir / "config.json").read_text())
    assert cfg["training"]["student"] == "mlp-endpoint" and cfg["training"]["warm_steps"] == 3
    # two generated batches against a memory of two data batches of 16
    assert (cfg["training"]["batch_size"], cfg["training"]["match_memory"]) == (64, 2)
    from steerflow.cli._common import load_flow
    from steerflow.models import EndpointMLP

    model = load_flow(out).model
    assert isinstance(model, EndpointMLP) and model.config["bounded"] and model.config["hidden"] == 32
    rc, _, err = run_cli(capsys, "sample", "--ckpt", out, "--n", 10, "--out", tmp_path / "e.npy")
    assert rc == 0, err
    head = model.net[-1]
    box = (head.weight.abs().sum(1) + head.bias.abs()).detach().numpy()
    assert (np.abs(np.load(tmp_path / "e.npy")) <= box + 1e-5).all()
    # the README's recommended recipe: a fresh velocity MLP, warm start, then ot-energy-full
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / "velocity", "--match",
                         "ot-energy-full", "--student", "mlp", "--student-width", 32, "--warm-steps", 3, *common)
    assert rc == 0, err
    velocity = load_flow(tmp_path / "velocity").model
    assert type(velocity).__name__ == "MLPVelocity" and velocity.config["hidden"] == 32
    for extra, msg in ((["--warm-steps", 3], "--match"), (["--match-memory", 2], "--match"),
                       (["--match", "ot-energy", "--warm-steps", 8], "--warm-steps"),
                       (["--match", "ot-energy", "--student-bounded"], "mlp-endpoint")):
        rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--out", tmp_path / "bad", *extra, *common)
        assert_one_line_error(rc, err, msg)


def test_error_paths_are_one_line_with_exit_code_2(capsys, trained, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--data", "nosuchdata", "--steps", 1, "--out", tmp_path / "x", *TINY)
    assert_one_line_error(rc, err, "nosuchdata")
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "missing.npy", "--steps", 1, "--out", tmp_path / "x")
    assert_one_line_error(rc, err, "missing.npy")
    rc, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "nope", "--out", tmp_path / "s.npy")
    assert_one_line_error(rc, err, "nope")
    rc, _, err = run_cli(capsys, "sample", "--ckpt", trained, "--n", 0, "--out", tmp_path / "s.npy")
    assert_one_line_error(rc, err, "--n")
    rc, _, err = run_cli(capsys, "sample", "--ckpt", trained, "--n", "ten", "--out", tmp_path / "s.npy")
    assert_one_line_error(rc, err, "--n")
    rc, _, err = run_cli(capsys, "eval", "--ckpt", trained, "--data", "digits", "--n", 10)
    assert rc == 2 and "Traceback" not in err  # wrong shapes (64-d digits vs a 2-d model), or digits missing
    rc, _, err = run_cli(capsys, "train", "--steps", 1, "--out", trained, *TINY)
    assert_one_line_error(rc, err, "--resume")  # refuses to overwrite a checkpoint
    # a misspelt flag: named, and the user is sent to the subcommand's own --help
    rc, _, err = run_cli(capsys, "distill", "--ckpt", trained, "--sliced-weigth", 1)
    assert_one_line_error(rc, err, "distill: unrecognized arguments: --sliced-weigth 1", "steerflow distill --help")
    rc, _, err = run_cli(capsys, "--bogus")
    assert_one_line_error(rc, err, "--bogus", "'steerflow --help'")

    # a corrupt checkpoint: truncated weights
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    step_dir = next(p for p in bad.iterdir() if p.name.startswith("step-"))
    (step_dir / "model.safetensors").write_bytes(b"\x00garbage")
    rc, _, err = run_cli(capsys, "sample", "--ckpt", bad, "--out", tmp_path / "s.npy", "--no-ema")
    assert_one_line_error(rc, err, "cannot load checkpoint")
    (step_dir / "config.json").write_text("{not json")
    rc, _, err = run_cli(capsys, "eval", "--ckpt", bad)
    assert_one_line_error(rc, err, "cannot load checkpoint")

    # a checkpoint whose stored config does not match its weights (a different model config)
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    cfg_path = next(p for p in other.iterdir() if p.name.startswith("step-")) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["config"]["width"] = 32
    cfg_path.write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "sample", "--ckpt", other, "--out", tmp_path / "s.npy")
    assert_one_line_error(rc, err, "does not match")
    # resuming with a different model config
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", 50, "--out", trained, "--resume",
                         "--model", "mlp-selu", "--hidden", "32", "--batch", "64", "--quiet")
    assert_one_line_error(rc, err)


def test_subprocess_entry_point_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "steerflow", "sample", "--ckpt", str(tmp_path / "none"),
                        "--out", str(tmp_path / "s.npy")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("steerflow: error: ") and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1


def test_demo_quick_writes_its_files(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "demo", "--quick", "--out", tmp_path / "demo")
    assert rc == 0, err
    d = tmp_path / "demo"
    for name in ("results.md", "results.json", "samples_by_nfe.png", "trajectories.png", "w2_vs_nfe.png",
                 "losses.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    res = json.loads((d / "results.json").read_text())
    assert set(res["scores"]) == {"1-RF", "OT-CFM", "2-RF", "distilled", "matched"}
    assert set(res["scores"]["OT-CFM"]) == {"1", "2", "4", "8", "dopri5"}
    assert set(res["scores"]["distilled"]) == set(res["scores"]["matched"]) == {"1"}
    for model, by_nfe in res["scores"].items():
        for s in by_nfe.values():
            assert np.isfinite(s["w2"]) and s["w2"] > 0
    # the straightening tools straighten, even at smoke-test sizes
    assert res["straightness"]["2-RF"] < res["straightness"]["1-RF"]
    assert "| 2-RF |" in (d / "results.md").read_text() and "W2" in out
