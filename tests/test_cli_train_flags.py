"""``steerflow train``'s optimisation and model flags reach the model, the data and the optimiser: ``--unet-width``
(the U-Net's channels), ``--image-size`` (images resized on load), ``--grad-clip`` (clipped gradients),
``--warmup`` and ``--lr-schedule`` (the learning rate at each logged step), ``--bf16`` (autocast, CUDA only),
``--tensorboard``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from steerflow.cli import _common as C
from steerflow.cli.train import build
from steerflow.training import load_checkpoint

TINY = ["--model", "mlp-selu", "--hidden", "16", "--batch", "32", "--quiet", "--ema", "0"]


def _log(d):
    return [json.loads(s) for s in (d / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_unet_width_and_image_size_reach_the_model_and_the_data(capsys, tmp_path, image_folder):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", image_folder, "--image-size", "8", "--unet-width", "8",
                         "--steps", "2", "--batch", "4", "--out", out, "--quiet", "--device", "cpu")
    assert rc == 0, err
    ck = load_checkpoint(out)
    assert ck.model.config["base_channels"] == 8 and ck.model.config["image_size"] == 8
    assert ck.model.config["in_channels"] == 3
    convs = [m for m in ck.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 8  # the stem has the base width
    with torch.no_grad():  # the network takes the resized 8 x 8 images
        assert ck.model(torch.zeros(2, 3, 8, 8), torch.zeros(2)).shape == (2, 3, 8, 8)
    assert json.loads((out / "run.json").read_text())["extra"]["image_size"] == 8
    # commands reading the checkpoint see its data at the size it was trained on
    rc, _, err = run_cli(capsys, "eval", "--ckpt", out, "--nfe", "2", "--n", "6", "--out", tmp_path / "e.json",
                         "--quiet")
    assert rc == 0, err


def test_image_size_and_unet_width_errors(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--image-size", "8", "--steps", "2",
                         "--out", tmp_path / "a", "--quiet")
    assert_one_line_error(rc, err, "--image-size", "image folders")
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--unet-width", "8", "--steps", "2",
                         "--out", tmp_path / "b", "--quiet")
    assert_one_line_error(rc, err, "--unet-width")


def _max_change(out, seed=0):
    with C.seeded(seed):
        start = build("mlp-selu", (2,), 16, None)
    trained = load_checkpoint(out).model
    return max(float((a - b).detach().abs().max()) for a, b in zip(trained.parameters(), start.parameters()))


def test_grad_clip_clips_the_gradient(capsys, tmp_path):
    """Adam's update is ≈ lr·g/(|g| + eps): gradients clipped to norm 1e-12 (far below eps = 1e-8) leave the
    weights almost where they started; unclipped, every step moves them by about lr."""
    common = ["train", "--data", "moons", "--steps", "3", "--lr", "1e-3", "--lr-schedule", "constant", *TINY]
    assert run_cli(capsys, *common, "--out", tmp_path / "free")[0] == 0
    assert run_cli(capsys, *common, "--grad-clip", "1e-12", "--out", tmp_path / "clipped")[0] == 0
    assert _max_change(tmp_path / "free") > 1e-3
    assert _max_change(tmp_path / "clipped") < 1e-6
    stored = json.loads((tmp_path / "clipped" / "latest.json").read_text())
    assert stored["step"] == 3


def test_warmup_sets_the_learning_rate_of_each_step(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "5", "--warmup", "5", "--lr", "1e-2",
                         "--ckpt-every", "2", "--out", out, *TINY)
    assert rc == 0, err
    assert [(r["step"], r["lr"]) for r in _log(out)] == [(2, pytest.approx(2e-2 / 5)), (4, pytest.approx(4e-2 / 5)),
                                                          (5, pytest.approx(1e-2))]
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "3", "--warmup", "4", "--out",
                         tmp_path / "long", *TINY)
    assert_one_line_error(rc, err, "--warmup")


def test_lr_schedule_and_its_old_name_are_one_flag(capsys, tmp_path):
    for flag in ("--lr-schedule", "--schedule"):
        out = tmp_path / flag.strip("-")
        rc, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "4", "--lr", "1e-2", flag, "cosine",
                             "--ckpt-every", "2", "--out", out, *TINY)
        assert rc == 0, err
        # cosine from the first step: lr·½(1 + cos(π k / steps)) for the update k = step - 1
        assert [r["lr"] for r in _log(out)] == [pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * k / 4))) for k in (1, 3)]


def test_bf16_needs_cuda(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "2", "--bf16", "--device", "cpu",
                         "--out", tmp_path / "run", *TINY)
    assert_one_line_error(rc, err, "--bf16", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is used on CUDA only")
def test_bf16_trains_under_autocast_on_cuda(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "3", "--bf16", "--device", "cuda",
                         "--out", out, *TINY)
    assert rc == 0, err
    assert load_checkpoint(out).config["training"]["amp"] == "bf16"


def test_tensorboard_flag(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "moons", "--steps", "2", "--tensorboard", "--out", out, *TINY]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        rc, _, err = run_cli(capsys, *args)
        assert_one_line_error(rc, err, "--tensorboard", "pip install tensorboard")
    else:
        rc, _, err = run_cli(capsys, *args)
        assert rc == 0, err
        assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
