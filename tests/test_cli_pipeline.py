"""The CLI on diffusers pipeline folders: sample / steer / invert / edit with --pipeline, PNG/JPEG in and out,
one-line errors (tiny random-weight pipelines saved to a temporary folder; no network)."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from steerflow.adapters import FlowPipeline  # noqa: E402
from steerflow.adapters.tiny import save_tiny_pipeline  # noqa: E402
from cli_helpers import assert_one_line_error, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_pipelines")
    out = {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sd3", "flux-schnell")}
    yy, xx = np.mgrid[0:34, 0:36]
    photo = np.stack([(xx * 7) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(root / "photo.png")
    Image.fromarray(photo[:32, :32]).save(root / "photo.jpg", quality=95)
    mask = np.zeros((34, 36), np.uint8)
    mask[8:20, 10:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:20, :20]).save(root / "small_mask.png")
    out["root"] = root
    return out


def run(argv, capsys):
    rc, _, err = run_cli(capsys, *argv)
    return rc, err


def test_sample_writes_a_png_grid_and_is_reproducible(files, tmp_path, capsys):
    args = ["sample", "--pipeline", files["sd3"], "--prompt", "a photo of a cat", "--n", 4, "--steps", 3,
            "--guidance", 7, "--seed", 1]
    rc, err = run(args + ["--out", tmp_path / "grid.png"], capsys)
    assert rc == 0, err
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.shape == (2 * (32 + 2) + 2, 2 * (32 + 2) + 2, 3)  # 2 × 2 tiles, 2-pixel gaps and border
    rc, _ = run(args + ["--out", tmp_path / "grid2.png"], capsys)
    assert np.array_equal(img, np.asarray(Image.open(tmp_path / "grid2.png")))
    rc, _ = run(args + ["--out", tmp_path / "latents.npy"], capsys)
    z = np.load(tmp_path / "latents.npy")
    assert z.shape == (4, 4, 16, 16)
    # the same draw through the Python API
    fp = FlowPipeline.from_pretrained(files["sd3"])
    ref = fp.generate("a photo of a cat", n=4, steps=3, guidance_scale=7.0, generator=torch.Generator().manual_seed(1),
                      output="latent")
    assert np.allclose(z, ref.numpy(), atol=1e-5)


def test_ckpt_pointing_at_a_pipeline_folder_is_accepted(files, tmp_path, capsys):
    rc, err = run(["sample", "--ckpt", files["flux-schnell"], "--prompt", "x", "--steps", 2, "--height", 32,
                   "--width", 48, "--out", tmp_path / "a.jpg"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "a.jpg").size == (48, 32)


@pytest.mark.parametrize("method", ["flowchef", "dps", "default", "enkg"])
def test_steer_inpaint_with_a_mask_image(files, tmp_path, capsys, method):
    out = tmp_path / f"{method}"
    rc, err = run(["steer", "--pipeline", files["sd3"], "--prompt", "a cat", "--task", "inpaint", "--input",
                   files["root"] / "photo.png", "--mask", files["root"] / "mask.png", "--method", method,
                   "--steps", 3, "--ensemble", 2, "--out", out], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["space"] == ("latent" if method == "default" else "pixel")
    assert np.isfinite(metrics["psnr_db"])
    # the photo (36 × 34) was cut to the model's multiple of 2 → kept as is; results have its size
    assert Image.open(out / "result.png").size == (36, 34)
    assert Image.open(out / "grid.png").size[0] > 3 * 36


@pytest.mark.parametrize("task,extra", [("superres", ["--factor", "4"]), ("deblur", ["--blur", "motion"]),
                                        ("colorize", []), ("denoise", [])])
def test_steer_pixel_tasks_write_a_png(files, tmp_path, capsys, task, extra):
    out = tmp_path / "out.png"
    rc, err = run(["steer", "--pipeline", files["flux-schnell"], "--task", task, "--input", files["root"] / "photo.jpg",
                   "--method", "flowchef", "--steps", 2, "--out", out, *extra], capsys)
    assert rc == 0, err
    assert Image.open(out).size == (32, 32)


def test_edit_and_invert(files, tmp_path, capsys):
    rc, err = run(["edit", "--pipeline", files["sd3"], "--input", files["root"] / "photo.png", "--prompt", "a dog",
                   "--steps", 3, "--out", tmp_path / "edited.png"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "edited.png").size == (36, 34)
    rc, err = run(["invert", "--pipeline", files["flux-schnell"], "--input", files["root"] / "photo.jpg", "--steps", 3,
                   "--out", tmp_path / "noise.npy"], capsys)
    assert rc == 0, err
    assert np.load(tmp_path / "noise.npy").shape == (1, 4, 16, 16)


def test_input_is_resized_to_the_models_multiple_with_a_warning(files, tmp_path, capsys):
    rc, err = run(["steer", "--pipeline", files["flux-schnell"], "--task", "denoise", "--input",
                   files["root"] / "photo.png", "--steps", 2, "--out", tmp_path / "o.png"], capsys)
    assert rc == 0, err
    assert "resized from 36x34 to 36x32" in err
    assert Image.open(tmp_path / "o.png").size == (36, 32)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--pipeline", "{root}/missing", "--prompt", "x", "--out", "{tmp}/a.png"], "no folder"),
    (["sample", "--pipeline", "{root}", "--prompt", "x", "--out", "{tmp}/a.png"], "not a diffusers pipeline folder"),
    (["sample", "--pipeline", "{sd3}", "--out", "{tmp}/a.png"], "needs --prompt"),
    (["sample", "--pipeline", "{sd3}", "--prompt", "x", "--out", "{tmp}/a.txt"], ".png/.jpg"),
    (["steer", "--pipeline", "{sd3}", "--task", "inpaint", "--input", "{root}/photo.png", "--mask",
      "{root}/small_mask.png", "--out", "{tmp}/o.png"], "must have the image's size"),
    (["steer", "--pipeline", "{sd3}", "--task", "inpaint", "--input", "{root}/nothere.png", "--out", "{tmp}/o.png"],
     "no file"),
    (["steer", "--pipeline", "{sd3}", "--task", "class", "--out", "{tmp}/o.png"], "not a pipeline task"),
    (["steer", "--ckpt", "{root}", "--task", "inpaint", "--input", "{root}/photo.png", "--mask",
      "{root}/mask.png", "--out", "{tmp}/o"], "mask images are for --pipeline"),
    (["sample", "--out", "{tmp}/a.npy"], "needs --ckpt"),
])
def test_bad_input_gets_one_line(files, tmp_path, capsys, argv, message):
    argv = [a.format(root=files["root"], tmp=tmp_path, sd3=files["sd3"]) for a in argv]
    rc, err = run(argv, capsys)
    assert_one_line_error(rc, err, message)


def test_prompt_on_a_pipeline_without_text_encoders(files, tmp_path, capsys):
    fp = FlowPipeline.from_pretrained(files["flux-schnell"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                      tokenizer_2=None)
    fp.pipeline.save_pretrained(str(tmp_path / "no_text"))
    rc, err = run(["sample", "--pipeline", tmp_path / "no_text", "--prompt", "x", "--out", tmp_path / "a.png"], capsys)
    assert_one_line_error(rc, err, "has no text encoder")
