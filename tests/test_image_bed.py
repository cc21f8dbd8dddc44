"""The 32×32 learned-prior bed: photo crops and their split, the inverse tasks, SSIM parity with scikit-image."""
import numpy as np
import pytest
import torch

skimage = pytest.importorskip("skimage")

from skimage.metrics import structural_similarity  # noqa: E402

from steerflow.data import available_datasets, load_dataset  # noqa: E402
from steerflow.data.photos import (COLOUR_PHOTOS, CROP_SPLITS, load_photo, photo_crops,  # noqa: E402
                                   photo_patches)
from steerflow.metrics.image import ssim  # noqa: E402
from steerflow.steering.tasks import build_task, freeform_mask  # noqa: E402

SHAPES = ((1, 32, 32), (3, 32, 32))


# --- data ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gray", "rgb"])
def test_crop_splits_share_no_photograph(mode):
    s = CROP_SPLITS[mode]
    assert set(s) == {"train", "val", "test"}
    assert not set(s["train"]) & set(s["val"])
    assert not set(s["train"]) & set(s["test"])
    assert not set(s["val"]) & set(s["test"])
    if mode == "rgb":
        assert set(s["train"]) | set(s["val"]) | set(s["test"]) <= set(COLOUR_PHOTOS)


def test_crops_shapes_ranges_and_counts():
    test = photo_crops(split="test")
    # non-overlapping 32×32 tiles: chelsea 300×451 -> 9·14, coffee 400×600 -> 12·18
    assert test.shape == (9 * 14 + 12 * 18, 1, 32, 32) and test.dtype == torch.float32
    assert test.min() >= -1 and test.max() <= 1
    val = photo_crops(split="val")
    assert val.shape == (13 * 20, 1, 32, 32)  # rocket 427×640
    rgb = photo_crops(split="test", rgb=True)
    assert rgb.shape == (342, 3, 32, 32) and rgb.min() >= -1 and rgb.max() <= 1
    # at least 64 textured held-out crops per split (the benchmark's filter)
    for split in ("val", "test"):
        for colour in (False, True):
            assert photo_crops(split=split, rgb=colour, min_std=0.1).shape[0] >= 64


def test_crops_are_tiles_of_the_photographs():
    img = load_photo("chelsea", rgb=True)  # (3, 300, 451)
    x = photo_crops(split="test", rgb=True)[: 9 * 14]
    tiled = x.reshape(9, 14, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(3, 9 * 32, 14 * 32)
    assert torch.equal(tiled, img[:, : 9 * 32, : 14 * 32])
    raw = torch.from_numpy(skimage.data.chelsea().astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(img, raw / 127.5 - 1.0)
    # the grayscale crops are the BT.709 luminance of the same pixels
    gray = photo_crops(split="test")[: 9 * 14]
    lum = (torch.tensor([0.2125, 0.7154, 0.0721])[:, None, None, None, None]
           * x.permute(1, 0, 2, 3)[:, :, None]).sum(0)
    torch.testing.assert_close(gray, lum, atol=1e-5, rtol=0)


def test_training_crops_overlap_with_the_documented_stride():
    x = photo_crops(split="train", stride=8)
    first = load_photo("camera")  # 512×512, the first training photograph
    n_cam = ((512 - 32) // 8 + 1) ** 2
    assert torch.equal(x[1, 0], first[0:32, 8:40])
    assert torch.equal(x[n_cam - 1, 0], first[480:512, 480:512])


def test_crops_are_deterministic_per_seed():
    a = photo_crops(split="test", min_std=0.1, max_crops=64, generator=torch.Generator().manual_seed(0))
    b = photo_crops(split="test", min_std=0.1, max_crops=64, generator=torch.Generator().manual_seed(0))
    c = photo_crops(split="test", min_std=0.1, max_crops=64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.flatten(1).std(1, correction=0) >= 0.1).all()


def test_no_test_crop_appears_among_training_or_validation_crops():
    test = photo_crops(split="test").flatten(1)
    for split in ("train", "val"):
        other = photo_crops(split=split, stride=32 if split == "train" else None).flatten(1)
        assert torch.cdist(test, other).min() > 0


def test_rgb_needs_colour_photographs_and_bad_splits_raise():
    with pytest.raises(ValueError, match="grayscale"):
        load_photo("camera", rgb=True)
    with pytest.raises(ValueError, match="grayscale"):
        photo_patches(32, images=("moon",), rgb=True)
    with pytest.raises(ValueError, match="split"):
        photo_crops(split="holdout")


def test_dataset_names_resolve_to_the_training_crops():
    assert {"photos32", "photos32-rgb"} <= set(available_datasets())
    ds = load_dataset("photos32")
    assert ds.shape[1:] == (1, 32, 32) and torch.equal(ds.x, photo_crops(split="train"))
    assert load_dataset("photos32-rgb").shape[1:] == (3, 32, 32)


# --- tasks --------------------------------------------------------------------------------------------------
def test_freeform_mask_coverage_and_determinism():
    fracs = []
    for seed in range(40):
        m = freeform_mask(32, 32, torch.Generator().manual_seed(seed))
        assert m.shape == (32, 32) and m.dtype == torch.bool
        fracs.append(1.0 - m.double().mean().item())
    fracs = np.array(fracs)
    assert fracs.min() >= 0.2 and fracs.max() <= 0.4
    assert fracs.std() > 0.02  # the target fraction varies from seed to seed
    a = freeform_mask(32, 32, torch.Generator().manual_seed(5))
    assert torch.equal(a, freeform_mask(32, 32, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, freeform_mask(32, 32, torch.Generator().manual_seed(6)))
    narrow = freeform_mask(48, 40, torch.Generator().manual_seed(0), coverage=(0.3, 0.32))
    assert 0.3 <= 1.0 - narrow.double().mean().item() <= 0.32
    with pytest.raises(ValueError, match="coverage"):
        freeform_mask(32, 32, coverage=(0.5, 0.2))


def test_freeform_task_hides_whole_pixels():
    op = build_task("freeform", (3, 32, 32), generator=torch.Generator().manual_seed(0))
    m = op.mask
    assert m.shape == (3, 32, 32) and torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])
    assert torch.equal(m[0], freeform_mask(32, 32, torch.Generator().manual_seed(0)))


def test_random_task_with_70_percent_missing():
    op = build_task("random", (1, 32, 32), generator=torch.Generator().manual_seed(0), p_observed=0.3)
    big = build_task("random", (1, 256, 256), generator=torch.Generator().manual_seed(0), p_observed=0.3)
    frac = big.mask.double().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / 256**2) ** 0.5  # within 4 binomial standard deviations
    again = build_task("random", (1, 32, 32), generator=torch.Generator().manual_seed(0), p_observed=0.3)
    assert torch.equal(op.mask, again.mask)


LINEAR_TASKS = [("box", {}), ("freeform", {}), ("random", {"p_observed": 0.3}), ("superres", {"factor": 4}),
                ("deblur", {"blur": "gaussian", "blur_size": 9, "blur_std": 2.0}),
                ("deblur", {"blur": "motion", "blur_size": 9, "blur_angle": 45.0}), ("denoise", {})]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("task,kwargs", LINEAR_TASKS)
def test_task_operators_satisfy_the_adjoint_identity(task, kwargs, shape):
    op = build_task(task, shape, generator=torch.Generator().manual_seed(3), **kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *shape, generator=g, dtype=torch.float64)
    ax = op(x)
    u = torch.randn(ax.shape, generator=g, dtype=torch.float64)
    lhs = (ax * u).flatten(1).sum(1)
    rhs = (x * op.adjoint(u)).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    if task == "superres":
        assert ax.shape == (4, shape[0], 8, 8)


# --- SSIM parity --------------------------------------------------------------------------------------------
def _skimage_ssim(x, y, data_range):
    out = []
    for a, b in zip(x.numpy(), y.numpy()):
        if a.shape[0] == 1:
            out.append(structural_similarity(a[0], b[0], data_range=data_range, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False))
        else:
            out.append(structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, channel_axis=0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_11x11_gaussian_matches_skimage_on_random_images(channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(6, channels, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(x, y, 2.0, window_size=11, sigma=1.5, reduction="none")
    torch.testing.assert_close(ours, _skimage_ssim(x, y, 2.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rgb", [False, True])
def test_ssim_11x11_gaussian_matches_skimage_on_photo_crops(rgb):
    x = photo_crops(split="test", rgb=rgb, min_std=0.1, max_crops=6,
                    generator=torch.Generator().manual_seed(0)).double()
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64) / 16
    c = x.shape[1]
    y = torch.nn.functional.conv2d(x, k.expand(c, 1, 3, 3), padding=1, groups=c)  # a blurred version
    y = (y + 0.02 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    y = y.clamp(-1, 1)
    ours = ssim(x, y, 2.0, window_size=11, sigma=1.5, reduction="none")
    torch.testing.assert_close(ours, _skimage_ssim(x, y, 2.0), rtol=0, atol=1e-6)
    # the same numbers in float32, and for images and data range scaled alike (C₁, C₂ scale with R²)
    ours32 = ssim(x.float(), y.float(), 2.0, window_size=11, sigma=1.5, reduction="none")
    torch.testing.assert_close(ours32, ours, rtol=0, atol=1e-6)
    unit = ssim(x / 2, y / 2, 1.0, window_size=11, sigma=1.5, reduction="none")
    torch.testing.assert_close(unit, ours, rtol=0, atol=1e-12)
