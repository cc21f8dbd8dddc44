"""Patches of scikit-image's bundled photographs (steerflow.data.photos)."""
import numpy as np
import pytest
import torch

skimage = pytest.importorskip("skimage")

from steerflow.data.photos import (PHOTOS, TEST_IMAGES, TRAIN_IMAGES, load_photo,  # noqa: E402
                                   photo_patches)


def test_shapes_range_and_count():
    x = photo_patches(8, images=("camera",))
    assert x.shape == (64 * 64, 1, 8, 8) and x.dtype == torch.float32  # 512×512 in 8×8 tiles
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0 and x.max() == 1.0  # camera spans 0..255
    y = photo_patches(16, images=("coins",), stride=5)
    assert y.shape == (((303 - 16) // 5 + 1) * ((384 - 16) // 5 + 1), 1, 16, 16)
    z = photo_patches(4, images=("camera",), downscale=4)
    assert z.shape == (32 * 32, 1, 4, 4)


def test_tiles_reassemble_the_photograph():
    img = load_photo("coins")  # 303 × 384: the last 303 - 37·8 = 7 rows are not covered
    x = photo_patches(8, images=("coins",))
    nH, nW = 303 // 8, 384 // 8
    tiled = x.reshape(nH, nW, 8, 8).permute(0, 2, 1, 3).reshape(nH * 8, nW * 8)
    assert torch.equal(tiled, img[: nH * 8, : nW * 8])
    # global normalisation is the fixed 8-bit map v / 127.5 - 1
    raw = torch.from_numpy(skimage.data.coins().astype(np.float32))
    torch.testing.assert_close(img, raw / 127.5 - 1.0)


def test_luminance_matches_skimage_rgb2gray():
    from skimage.color import rgb2gray

    img = load_photo("chelsea")
    ref = torch.from_numpy(rgb2gray(skimage.data.chelsea()).astype(np.float32)) * 2.0 - 1.0  # rgb2gray is in [0, 1]
    torch.testing.assert_close(img, ref, atol=1e-5, rtol=0)


def test_image_normalisation_stretches_each_photograph():
    img = load_photo("brick", normalize="image")  # brick spans 63..207 only
    assert img.min().item() == pytest.approx(-1.0) and img.max().item() == pytest.approx(1.0)
    assert load_photo("brick").max() < 0.7


def test_downscale_is_block_mean():
    img = load_photo("camera")
    z = photo_patches(4, images=("camera",), downscale=2, stride=4)
    ref = img[:8, :8].reshape(4, 2, 4, 2).mean(dim=(1, 3))
    torch.testing.assert_close(z[0, 0], ref)


def test_determinism_with_a_generator():
    a = photo_patches(8, split="test", max_patches=50, generator=torch.Generator().manual_seed(3))
    b = photo_patches(8, split="test", max_patches=50, generator=torch.Generator().manual_seed(3))
    c = photo_patches(8, split="test", max_patches=50, generator=torch.Generator().manual_seed(4))
    assert a.shape == (50, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    every = photo_patches(8, split="test").flatten(1)
    # the subset is drawn from the grid patches, without replacement
    assert all((every == p).all(1).any() for p in a.flatten(1))
    assert torch.unique(a.flatten(1), dim=0).shape[0] == 50


def test_min_std_drops_flat_patches():
    every = photo_patches(8, split="test")
    kept = photo_patches(8, split="test", min_std=0.1)
    std = every.flatten(1).std(1, correction=0)
    assert kept.shape[0] == int((std >= 0.1).sum()) and 0 < kept.shape[0] < every.shape[0]
    assert (kept.flatten(1).std(1, correction=0) >= 0.1).all()


def test_train_and_test_photographs_are_disjoint():
    assert set(TRAIN_IMAGES).isdisjoint(TEST_IMAGES) and set(TRAIN_IMAGES) | set(TEST_IMAGES) <= set(PHOTOS)
    train = photo_patches(8, split="train", min_std=0.1).flatten(1)
    test = photo_patches(8, split="test", min_std=0.1).flatten(1)
    # no textured test patch occurs (pixel for pixel) among the training patches
    both = torch.cat([train, test])
    n_unique = [torch.unique(z, dim=0).shape[0] for z in (both, train, test)]
    assert n_unique[0] == n_unique[1] + n_unique[2]
    assert torch.equal(photo_patches(8, split="test"), photo_patches(8, images=TEST_IMAGES))


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=("lena",)), "unknown photograph 'lena'"),
    (dict(images="camera"), "sequence of names"),
    (dict(images=()), "at least one"),
    (dict(split="val"), "unknown split 'val'"),
    (dict(size=1), "size must be an int >= 2"),
    (dict(size=8.0), "size must be an int >= 2"),
    (dict(stride=0), "stride must be an int >= 1"),
    (dict(downscale=0), "downscale must be an int >= 1"),
    (dict(max_patches=0), "max_patches must be an int >= 1"),
    (dict(min_std=-0.1), "min_std must be a number >= 0"),
    (dict(min_std=5.0), "no patch"),
    (dict(normalize="zscore"), "unknown normalize"),
    (dict(size=200, images=("page",)), "expected at least 200×200"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        photo_patches(**kwargs)


def test_registry_name():
    from steerflow.data import available_datasets, load_dataset

    assert "photo_patches" in available_datasets()
    ds = load_dataset("photo_patches")
    assert ds.shape == tuple(photo_patches(8).shape) and ds.labels is None
