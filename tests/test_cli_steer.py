"""``steerflow steer | invert | edit``: outputs, invariants through the CLI, one-line errors."""
import json

import numpy as np
import pytest
import torch

from steerflow.cli.main import main
from steerflow.models import MLPVelocity
from steerflow.training import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = MLPVelocity(dim=64, hidden=32, depth=2, time_embed_dim=16, n_classes=10)
    save_checkpoint(d, model, config={}, step=0)
    return str(d)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 1, 8, 8)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, x


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_steer_writes_result_measurement_grid_and_metrics(ckpt, images, tmp_path, capsys):
    d, x = images
    out = tmp_path / "inpaint"
    rc, so, se = _run(["steer", "--ckpt", ckpt, "--task", "inpaint", "--method", "default", "--input",
                       str(d / "x.npy"), "--out", str(out), "--steps", "5", "--noise", "0.05"], capsys)
    assert rc == 0, se
    for f in ("input.npy", "measurement.npy", "result.npy", "grid.png", "metrics.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "default" and m["nfe"] == 5 and m["data_range"] == 2.0
    res = np.load(out / "result.npy")
    assert res.shape == (2, 1, 8, 8) and np.isfinite(res).all()
    # PSNR in the JSON is the PSNR of the saved result against the input
    mse = ((np.clip(res, -1, 1) - x) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(m["psnr_per_image"], 10 * np.log10(4 / mse), atol=1e-4)
    # the measurement is the box-masked input (centre 4×4 hidden) plus noise of the stated std
    y = np.load(out / "measurement.npy")
    Ax = x.copy()
    Ax[:, :, 2:6, 2:6] = 0
    assert 0.035 < np.std(y - Ax) < 0.065 and abs(np.mean(y - Ax)) < 0.02
    # same seed, same result
    rc, _, _ = _run(["steer", "--ckpt", ckpt, "--task", "inpaint", "--method", "default", "--input",
                     str(d / "x.npy"), "--out", str(tmp_path / "again"), "--steps", "5"], capsys)
    assert rc == 0 and np.array_equal(np.load(tmp_path / "again" / "result.npy"), res)


@pytest.mark.parametrize("task,method,mshape", [("superres", "flowchef", (2, 1, 4, 4)), ("deblur", "dps", (2, 1, 8, 8)),
                                                 ("denoise", "enkg", (2, 1, 8, 8))])
def test_steer_tasks_and_methods(ckpt, images, tmp_path, capsys, task, method, mshape):
    d, _ = images
    rc, _, se = _run(["steer", "--ckpt", ckpt, "--task", task, "--method", method, "--input", str(d / "x.npy"),
                      "--out", str(tmp_path), "--steps", "4", "--ensemble", "4"], capsys)
    assert rc == 0, se
    assert np.load(tmp_path / "measurement.npy").shape == mshape
    assert np.load(tmp_path / "result.npy").shape == (2, 1, 8, 8)


def test_steer_class(ckpt, tmp_path, capsys):
    rc, _, se = _run(["steer", "--ckpt", ckpt, "--task", "class", "--class-label", "3", "--scale", "2",
                      "--n", "4", "--out", str(tmp_path), "--steps", "4"], capsys)
    assert rc == 0, se
    assert np.load(tmp_path / "result.npy").shape == (4, 1, 8, 8)
    assert json.loads((tmp_path / "metrics.json").read_text())["nfe"] == 8  # CFG: a doubled batch per step


def test_invert_gamma_one_lands_on_the_seeded_noise(ckpt, images, tmp_path, capsys):
    d, x = images
    out = tmp_path / "z.npy"
    rc, _, se = _run(["invert", "--ckpt", ckpt, "--input", str(d / "x.npy"), "--out", str(out), "--gamma", "1",
                      "--steps", "6", "--seed", "4"], capsys)
    assert rc == 0, se
    z_expected = torch.randn((2, 64), generator=torch.Generator().manual_seed(4)).numpy().reshape(2, 1, 8, 8)
    assert np.allclose(np.load(out), z_expected, atol=1e-5)
    # gamma 0 is the plain ODE inversion, deterministic and different
    rc, _, _ = _run(["invert", "--ckpt", ckpt, "--input", str(d / "x.npy"), "--out", str(tmp_path / "z0.npy"),
                     "--steps", "6"], capsys)
    assert rc == 0 and not np.allclose(np.load(tmp_path / "z0.npy"), z_expected, atol=1e-2)


def test_edit_with_eta_one_everywhere_returns_the_input(ckpt, images, tmp_path, capsys):
    d, x = images
    rc, _, se = _run(["edit", "--ckpt", ckpt, "--input", str(d / "x.npy"), "--out", str(tmp_path), "--eta", "1",
                      "--window", "0,1", "--steps", "6", "--class-label", "7"], capsys)
    assert rc == 0, se
    assert np.allclose(np.load(tmp_path / "result.npy"), x, atol=1e-5)
    for f in ("noise.npy", "grid.png", "metrics.json"):
        assert (tmp_path / f).is_file()


def _bad(argv, capsys, needle):
    rc, _, se = _run(argv, capsys)
    assert rc == 2, se
    lines = [ln for ln in se.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in se, se
    assert needle in se, se


def test_one_line_errors(ckpt, images, tmp_path, capsys):
    d, _ = images
    base = ["steer", "--ckpt", ckpt, "--task", "inpaint", "--out", str(tmp_path / "o"), "--steps", "2"]
    _bad(base + ["--input", str(tmp_path / "missing.npy")], capsys, "no file")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5), np.float32))
    _bad(base + ["--input", str(tmp_path / "wrong.npy")], capsys, "expects images of shape (1, 8, 8)")
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    _bad(base + ["--input", str(tmp_path / "nan.npy")], capsys, "NaN")
    _bad(base + ["--input", str(d / "x.npy"), "--method", "nope"], capsys, "invalid choice")
    _bad(["steer", "--ckpt", ckpt, "--task", "recolour", "--input", str(d / "x.npy"), "--out", str(tmp_path)],
         capsys, "invalid choice")
    _bad(["steer", "--ckpt", ckpt, "--task", "colorize", "--input", str(d / "x.npy"), "--out", str(tmp_path)],
         capsys, "is for --pipeline")
    _bad(["steer", "--ckpt", str(tmp_path / "nockpt"), "--task", "denoise", "--input", str(d / "x.npy"),
          "--out", str(tmp_path)], capsys, "no checkpoint")
    _bad(["steer", "--ckpt", ckpt, "--task", "class", "--class-label", "12", "--out", str(tmp_path)], capsys,
         "--class-label must lie in [0, 9]")
    _bad(["invert", "--ckpt", ckpt, "--input", str(d / "x.npy"), "--out", str(tmp_path / "z.txt")], capsys, ".npy")
    _bad(["edit", "--ckpt", ckpt, "--input", str(d / "x.npy"), "--out", str(tmp_path), "--window", "0.5,0.2"],
         capsys, "t_start")
    _bad(["edit", "--ckpt", ckpt, "--input", str(d / "x.npy"), "--out", str(tmp_path), "--eta", "1.5"],
         capsys, "[0, 1]")


def test_sample_writes_a_png_grid_for_an_image_model(ckpt, tmp_path, capsys):
    from PIL import Image

    rc, _, se = _run(["sample", "--ckpt", ckpt, "--n", "6", "--steps", "3", "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 0, se
    assert Image.open(tmp_path / "g.png").size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # 3 × 2 tiles, 2-pixel gaps
    rc, _, _ = _run(["sample", "--ckpt", ckpt, "--n", "6", "--steps", "3", "--out", str(tmp_path / "s.npy")], capsys)
    grid = np.asarray(Image.open(tmp_path / "g.png"), dtype=np.float32) / 127.5 - 1
    first = np.load(tmp_path / "s.npy")[0].reshape(8, 8).clip(-1, 1)
    assert np.abs(grid[2:10, 2:10, 0] - first).max() < 1 / 127.5 + 1e-6  # the same draw, to 8-bit rounding
    flat = tmp_path / "flat"
    save_checkpoint(flat, MLPVelocity(dim=2, hidden=8, depth=1), config={}, step=0)
    rc, _, se = _run(["sample", "--ckpt", str(flat), "--out", str(tmp_path / "f.png")], capsys)
    assert rc == 2 and "for image models" in se


def test_steer_guidance_window(ckpt, images, tmp_path, capsys):
    """``--guidance-window 0,1`` is the default exactly; a window changes the result; an empty window is refused."""
    d, _ = images
    common = ["steer", "--ckpt", ckpt, "--task", "inpaint", "--input", str(d / "x.npy"), "--steps", "6"]
    base = common + ["--method", "dps"]
    results = {}
    for name, argv in (("default", base), ("full", base + ["--guidance-window", "0,1"]),
                       ("late", base + ["--guidance-window", "0.5,1"]),
                       ("unguided", common + ["--method", "unguided"])):
        rc, _, se = _run(argv + ["--out", str(tmp_path / name)], capsys)
        assert rc == 0, se
        results[name] = np.load(tmp_path / name / "result.npy")
    assert json.loads((tmp_path / "late" / "metrics.json").read_text())["guidance_window"] == [0.5, 1.0]
    assert np.array_equal(results["default"], results["full"])
    assert not np.allclose(results["late"], results["full"]) and not np.allclose(results["late"], results["unguided"])
    rc, _, se = _run(base + ["--out", str(tmp_path / "bad"), "--guidance-window", "0.5,0.5"], capsys)
    assert rc != 0 and "window" in se and len(se.strip().splitlines()) == 1
