import math

import numpy as np
import pytest
import torch

from steerflow.data import (TOYS, ArrayDataset, GaussianMixture, ToyDataset, load_array, load_dataset, load_digits,
                            load_image_folder, sample_toy)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mixture_still_exported():
    assert GaussianMixture([1.0], [[0.0, 0.0]], 1.0).dim == 2


# --- toys ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toys_shape_dtype_determinism(name):
    a = sample_toy(name, 501, _gen(1))
    b = sample_toy(name, 501, _gen(1))
    c = sample_toy(name, 501, _gen(2))
    assert a.shape == (501, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.abs().max() < 12  # "unit-to-few" scale


def test_toy_statistics():
    n = 100_000
    # moons (torchcfm scale): mean 3 (1/2 + 0.1, 1/4 + 0.1) - 1 = (0.8, 0.05)
    x = sample_toy("moons", n, _gen(3)).double()
    se = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - torch.tensor([0.8, 0.05], dtype=torch.float64)).abs() < 4 * se).all(), x.mean(0)
    # labelled moons: the same draws; per moon the mean is 3 (E cos φ + 0.1, E sin φ + 0.1) - 1 (upper) and
    # 3 (1 + 0.1, 1/2 - E sin φ + 0.1) - 1 (lower), E cos φ = 0, E sin φ = 2/π
    from steerflow.data.toys import moons

    pts, lab = moons(n, _gen(3), return_labels=True)
    assert torch.equal(pts.float(), sample_toy("moons", n, _gen(3))) and lab.dtype == torch.long
    assert abs(lab.double().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(n)
    s = 2 / math.pi
    for k, mean in ((0, [3 * 0.1 - 1, 3 * (s + 0.1) - 1]), (1, [3 * 1.1 - 1, 3 * (0.6 - s) - 1])):
        xk = pts[lab == k]
        assert ((xk.mean(0) - torch.tensor(mean, dtype=torch.float64)).abs() < 4 * xk.std(0) / math.sqrt(len(xk))).all()
    # 8gaussians (torchcfm scale): centres at radius 5, noise covariance sqrt(0.1) I:
    # E|x|² = 25 + 2 sqrt(0.1); mean 0; the nearest centre is at distance ~ |noise|
    x = sample_toy("8gaussians", n, _gen(4)).double()
    r2 = x.square().sum(1)
    assert abs(r2.mean().item() - (25 + 2 * math.sqrt(0.1))) < 4 * r2.std().item() / math.sqrt(n)
    assert x.mean(0).abs().max() < 0.05
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 5 * torch.stack([angles.cos(), angles.sin()], 1)
    resid = (x[:, None, :] - centres).square().sum(-1).min(1).values
    assert resid.mean().item() == pytest.approx(2 * math.sqrt(0.1), rel=0.02)
    # gaussian: standard normal
    z = sample_toy("gaussian", n, _gen(5)).double()
    assert z.mean(0).abs().max() < 0.02 and (z.var(0) - 1).abs().max() < 0.02
    # swissroll: E[τ cos τ] = 6π / 3π = 2 and E[τ sin τ] = 2 / 3π for τ ~ U[1.5π, 4.5π], divided by 5
    x = sample_toy("swissroll", n, _gen(8)).double()
    se = x.std(0) / math.sqrt(n)
    ref = torch.tensor([2 / 5, 2 / (3 * math.pi) / 5], dtype=torch.float64)
    assert ((x.mean(0) - ref).abs() < 4 * se).all(), x.mean(0)
    # spirals: two arms mirrored through the origin, so mean ≈ (0.5 E[ε]/3)(p₊ - p₋) ≈ 0
    x = sample_toy("spirals", n, _gen(9)).double()
    assert (x.mean(0).abs() < 4 * x.std(0) / math.sqrt(n)).all()
    # checkerboard: uniform on 8 of 16 cells of [-4, 4]², the "even" cells
    x = sample_toy("checkerboard", 20_000, _gen(6)).double()
    assert x.abs().max() <= 4.0
    cells = torch.floor(x / 2)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    # circles: radii 3 and 1.5 in equal proportion
    r = sample_toy("circles", 20_000, _gen(7)).double().norm(dim=1)
    outer = r > 2.25  # midway between the radii; noise std 0.24 makes crossings ~1e-3 rare
    assert outer.double().mean().item() == pytest.approx(0.5, abs=0.02)
    # E|ρ e + ε| ≈ ρ + σ² / (2ρ) for ε ~ N(0, σ² I₂), σ = 0.24
    assert r[outer].mean().item() == pytest.approx(3.0 + 0.24**2 / 6, abs=0.01)
    assert r[~outer].mean().item() == pytest.approx(1.5 + 0.24**2 / 3, abs=0.01)


def test_sample_toy_errors():
    with pytest.raises(ValueError, match="unknown toy"):
        sample_toy("moon", 10)
    with pytest.raises(ValueError, match="positive integer"):
        sample_toy("moons", 0)


# --- ArrayDataset --------------------------------------------------------------------------------------------
def test_array_dataset_sample_split():
    x = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    labels = torch.arange(100) % 3
    ds = ArrayDataset(x, labels)
    assert len(ds) == 100 and ds.shape == (100, 2) and ds.event_shape == (2,)
    xb, lb = ds.sample(16, _gen(0))
    assert xb.shape == (16, 2) and torch.equal(lb, (xb[:, 0] / 2).long() % 3)
    xb2, _ = ds.sample(16, _gen(0))
    assert torch.equal(xb, xb2)
    xs, _ = ds.sample(100, _gen(0), replace=False)
    assert torch.equal(xs[:, 0].sort().values, x[:, 0])
    tr, va, te = ds.split((0.7, 0.2, 0.1), _gen(1))
    assert (len(tr), len(va), len(te)) == (70, 20, 10)
    joined = torch.cat([tr.x, va.x, te.x])[:, 0].sort().values
    assert torch.equal(joined, x[:, 0])  # disjoint and complete
    assert torch.equal(tr.labels, (tr.x[:, 0] / 2).long() % 3)
    assert ArrayDataset(x).sample(5, _gen(0)).shape == (5, 2)
    with pytest.raises(ValueError, match="sum to 1"):
        ds.split((0.5, 0.2))
    with pytest.raises(ValueError, match="distinct"):
        ds.sample(101, replace=False)


def test_array_dataset_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        ArrayDataset(torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(ValueError, match=r"\(N, \*d\)"):
        ArrayDataset(torch.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(torch.zeros(5, 2), torch.zeros(4))
    with pytest.raises(TypeError):
        ArrayDataset([[1.0, 2.0]])


def test_toy_dataset_fresh_samples():
    ds = load_dataset("moons")
    assert isinstance(ds, ToyDataset) and ds.shape[1:] == (2,)
    a, b = ds.sample(64, _gen(0)), ds.sample(64, _gen(0))
    assert torch.equal(a, b) and not torch.equal(a, ds.sample(64, _gen(1)))
    g = _gen(2)
    assert not torch.equal(ds.sample(64, g), ds.sample(64, g))
    parts = ds.split((0.8, 0.2))
    assert [len(p) for p in parts] == [8000, 2000]


# --- loaders -------------------------------------------------------------------------------------------------
def test_load_digits():
    pytest.importorskip("sklearn")
    ds = load_digits()
    assert ds.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert ds.labels.shape == (1797,) and set(ds.labels.tolist()) == set(range(10))
    assert load_dataset("digits").shape == (1797, 1, 8, 8)


def test_load_npy_npz_csv(tmp_path):
    a = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    ds = load_array(tmp_path / "a.npy")
    assert ds.shape == (10, 3) and np.array_equal(ds.x.numpy(), a)
    assert load_dataset(str(tmp_path / "a.npy")).shape == (10, 3)
    np.savez(tmp_path / "b.npz", x=a, labels=np.arange(10))
    ds = load_array(tmp_path / "b.npz")
    assert np.array_equal(ds.x.numpy(), a) and ds.labels.tolist() == list(range(10))
    np.save(tmp_path / "v.npy", np.arange(7))
    assert load_array(tmp_path / "v.npy").shape == (7, 1)
    (tmp_path / "c.csv").write_text("# samples\nx,y\n1.0, 2.0\n\n3,4 # last\n-1e-3,5\n")
    ds = load_array(tmp_path / "c.csv")
    np.testing.assert_allclose(ds.x.numpy(), [[1, 2], [3, 4], [-1e-3, 5]])
    (tmp_path / "w.csv").write_text("1 2 3\n4 5 6\n")
    assert load_array(tmp_path / "w.csv").shape == (2, 3)


def test_load_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_array(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        load_dataset(str(tmp_path / "nothere.csv"))
    with pytest.raises(ValueError, match="8gaussians"):  # unknown name lists the options
        load_dataset("mnist")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN"):
        load_array(tmp_path / "nan.npy")
    np.save(tmp_path / "s.npy", np.float64(3.0))
    with pytest.raises(ValueError, match="scalar"):
        load_array(tmp_path / "s.npy")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match="line 3"):
        load_array(tmp_path / "bad.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="columns"):
        load_array(tmp_path / "ragged.csv")
    (tmp_path / "t.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_array(tmp_path / "t.txt")


def test_load_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("cat", "ant"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
            pixels[(cls, i)] = arr
    ds = load_image_folder(tmp_path / "imgs")
    assert ds.shape == (6, 3, 6, 5) and ds.classes == ("ant", "cat")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.from_numpy(pixels[("cat", 1)]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(ds.x[4], expected)
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    gray = load_image_folder(tmp_path / "imgs", size=4, grayscale=True)
    assert gray.shape == (6, 1, 4, 4) and gray.labels is not None
    assert load_dataset(tmp_path / "imgs").shape == (6, 3, 6, 5)
    # flat folder: no labels; different sizes need size=
    (tmp_path / "flat").mkdir()
    Image.fromarray(pixels[("cat", 0)]).save(tmp_path / "flat" / "a.png")
    Image.fromarray(rng.integers(0, 256, size=(4, 4), dtype=np.uint8)).save(tmp_path / "flat" / "b.jpg")
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(tmp_path / "flat")
    flat = load_image_folder(tmp_path / "flat", size=(3, 3))
    assert flat.shape == (2, 3, 3, 3) and flat.labels is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_image_folder(tmp_path / "nope")
