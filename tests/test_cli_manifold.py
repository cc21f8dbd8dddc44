"""Flows on manifolds through the ordinary command line: ``train --manifold`` → ``sample`` → ``eval`` →
``plot`` on a latitude/longitude CSV, the same on a torus from a .npy, and one-line errors (exit 2)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from steerflow.cli import _common as C
from steerflow.cli.main import main
from steerflow.data.earth import latlon_to_xyz, load_latlon_csv, random_split
from steerflow.manifolds import Sphere, TangentVelocity, manifold_log_likelihood

QUICK = ["--hidden", "16", "--batch", "32", "--quiet"]
LOG_4PI = math.log(4 * math.pi)


def write_latlon_csv(path, n: int, seed: int = 0, spread: float = 8.0) -> None:
    """Two clusters (Iceland-ish and New-Zealand-ish), ``spread`` degrees wide, with a header row."""
    rng = np.random.default_rng(seed)
    centres = np.array([[64.0, -19.0], [-39.0, 175.0]])
    c = centres[rng.integers(0, 2, n)]
    lat = np.clip(c[:, 0] + spread * rng.standard_normal(n), -89.9, 89.9)
    lon = (c[:, 1] + spread * rng.standard_normal(n) + 180.0) % 360.0 - 180.0
    path.write_text("latitude,longitude\n" + "".join(f"{a:.5f},{b:.5f}\n" for a, b in zip(lat, lon)))


@pytest.fixture(scope="module")
def sphere_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sphere")
    csv = d / "events.csv"
    write_latlon_csv(csv, 60)
    ckpt = d / "run"
    rc = main(["train", "--manifold", "sphere2", "--data", str(csv), "--split", "train", "--seed", "3",
               "--steps", "30", "--out", str(ckpt), *QUICK])
    assert rc == 0
    return csv, ckpt


def test_train_records_the_manifold_and_load_flow_rebuilds_the_tangent_field(sphere_run):
    csv, ckpt = sphere_run
    info = json.loads((ckpt / "run.json").read_text())
    assert info["manifold"] == "sphere2" and info["path"] == "geodesic" and info["coupling"] == "independent"
    assert info["network"]["name"] == "mlp" and info["network"]["config"]["dim"] == 3
    assert info["split"] == "train" and info["split_seed"] == 3
    loaded = C.load_flow(ckpt, allow_manifold=True)
    assert isinstance(loaded.model, TangentVelocity) and loaded.manifold.name == "sphere2"
    # the rebuilt field is tangent: <x, v(x, t)> = 0 on S²
    x = Sphere(2).random_base(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = loaded.model(x, torch.full((64,), 0.5))
    assert (x * v).sum(-1).abs().max() < 1e-5
    # EMA and raw weights both load; they differ after training with EMA
    raw = C.load_flow(ckpt, allow_manifold=True, ema=False).model
    assert any((a - b).abs().max() > 0 for a, b in zip(raw.parameters(), loaded.model.parameters()))


def test_sample_points_on_the_sphere_and_latlon_csv(sphere_run, tmp_path, capsys):
    _, ckpt = sphere_run
    out = tmp_path / "s.npy"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", 200, "--steps", 20, "--out", out, "--seed", 5)
    assert rc == 0, err
    x = np.load(out)
    assert x.shape == (200, 3) and np.isfinite(x).all()
    assert np.abs(np.linalg.norm(x, axis=1) - 1).max() < 1e-5
    # same seed, same samples; written as lat/lon CSV they read back to the same unit vectors
    out_csv = tmp_path / "s.csv"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", 200, "--steps", 20, "--out", out_csv, "--seed", 5)
    assert rc == 0, err
    assert out_csv.read_text().splitlines()[0] == "lat,lon"
    back = load_latlon_csv(out_csv, dtype=torch.float64).numpy()
    assert np.abs(back - x).max() < 1e-5
    out_ll = tmp_path / "ll.npy"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", 200, "--steps", 20, "--out", out_ll, "--seed", 5,
                         "--latlon")
    assert rc == 0, err
    ll = np.load(out_ll)
    assert ll.shape == (200, 2) and np.abs(ll[:, 0]).max() <= 90 and np.abs(ll[:, 1]).max() <= 180
    assert np.abs(latlon_to_xyz(ll[:, 0], ll[:, 1], dtype=torch.float64).numpy() - x).max() < 1e-5


def test_eval_reports_the_test_nll_of_the_recorded_split(sphere_run, tmp_path, capsys):
    csv, ckpt = sphere_run
    out = tmp_path / "eval.json"
    rc, stdout, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 16, "--out", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    # default: the test part of the split the checkpoint was trained with (seed 3), 10 % of 60 points
    assert res["split"] == "test" and res["seed"] == 3 and res["n"] == 6
    assert math.isfinite(res["nll"]) and abs(res["base_nll"] - LOG_4PI) < 1e-9
    assert "2.531" in stdout
    # the number is -mean log p_1 over exactly those points (same split, same solver)
    x = load_latlon_csv(csv)
    _, _, test = random_split(x, (0.8, 0.1, 0.1), generator=torch.Generator().manual_seed(3))
    model = C.load_flow(ckpt, allow_manifold=True).model
    with torch.no_grad():
        ref = -manifold_log_likelihood(model, test, Sphere(2), method="rk4", steps=16).double().mean()
    assert abs(res["nll"] - float(ref)) < 1e-6


def test_training_on_a_concentrated_csv_beats_the_uniform_density(tmp_path, capsys):
    """Two clusters ~4° wide have density far above 1/4π; a short run must learn much of that."""
    csv = tmp_path / "cap.csv"
    write_latlon_csv(csv, 200, seed=1, spread=4.0)
    ckpt = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 250, "--lr", "3e-3",
                         "--ema", 0, "--hidden", 64, "--batch", 64, "--quiet", "--out", ckpt)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 16, "--n", 100)
    assert rc == 0, err
    res = json.loads((ckpt / "eval.json").read_text())
    assert res["split"] == "all" and res["n"] == 100
    assert res["nll"] < 0.0, res  # measured: about -2.1 nats (uniform: +2.53)


def test_plot_sphere_samples_on_a_map(sphere_run, tmp_path, capsys):
    csv, ckpt = sphere_run
    png = tmp_path / "map.png"
    rc, _, err = run_cli(capsys, "plot", "--ckpt", ckpt, "--n", 100, "--steps", 8, "--out", png)
    assert rc == 0, err
    assert png.stat().st_size > 1000
    png2 = tmp_path / "csv.png"
    rc, _, err = run_cli(capsys, "plot", "--samples", csv, "--out", png2)
    assert rc == 0 and png2.stat().st_size > 1000, err


def test_torus_from_npy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pts = np.mod(np.array([1.0, 4.0]) + 0.3 * rng.standard_normal((50, 2)), 2 * np.pi).astype(np.float32)
    data = tmp_path / "angles.npy"
    np.save(data, pts)
    ckpt = tmp_path / "torus"
    rc, _, err = run_cli(capsys, "train", "--manifold", "torus2", "--data", data, "--steps", 10, "--out", ckpt, *QUICK)
    assert rc == 0, err
    out = tmp_path / "t.npy"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", 64, "--steps", 8, "--out", out)
    assert rc == 0, err
    x = np.load(out)
    assert x.shape == (64, 2) and (x >= 0).all() and (x < 2 * np.pi).all()
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 8, "--n", 20)
    assert rc == 0, err
    # the network sees (cos θ, sin θ): the stored field is 2π-periodic in every angle, continuous at the seam
    import json

    import torch

    from steerflow.cli._common import load_flow

    assert json.loads((ckpt / "run.json").read_text())["network"]["embed"] == "periodic"
    v = load_flow(ckpt, allow_manifold=True).model
    theta = torch.rand(32, 2, dtype=torch.float32) * 2 * np.pi
    t = torch.rand(32)
    with torch.no_grad():
        for shift in ([2 * np.pi, 0.0], [0.0, -2 * np.pi], [4 * np.pi, 2 * np.pi]):
            torch.testing.assert_close(v(theta + torch.tensor(shift, dtype=torch.float32), t), v(theta, t),
                                       rtol=0, atol=1e-5)
        eps = 1e-4  # just below and just above the seam θ = 0 ≡ 2π
        below = v(torch.tensor([[2 * np.pi - eps, 1.0]], dtype=torch.float32), t[:1])
        above = v(torch.tensor([[eps, 1.0]], dtype=torch.float32), t[:1])
        assert (below - above).abs().max() < 1e-2
    # a product with a torus factor: the angle enters as (cos θ, sin θ) too
    s2 = rng.standard_normal((50, 3))
    prod = np.concatenate([s2 / np.linalg.norm(s2, axis=1, keepdims=True), pts[:, :1]], axis=1).astype(np.float32)
    np.save(tmp_path / "prod.npy", prod)
    ckpt2 = tmp_path / "prod"
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2xtorus1", "--data", tmp_path / "prod.npy", "--steps", 5,
                         "--out", ckpt2, *QUICK)
    assert rc == 0, err
    net = json.loads((ckpt2 / "run.json").read_text())["network"]
    assert net["embed"] == "periodic" and net["config"]["in_dim"] == 5 and net["config"]["dim"] == 4
    v2 = load_flow(ckpt2, allow_manifold=True).model
    x = torch.from_numpy(prod[:8])
    with torch.no_grad():
        torch.testing.assert_close(v2(x + torch.tensor([0.0, 0.0, 0.0, 2 * np.pi]), t[:8]), v2(x, t[:8]),
                                   rtol=0, atol=1e-5)
    res = json.loads((ckpt / "eval.json").read_text())
    assert abs(res["base_nll"] - 2 * math.log(2 * math.pi)) < 1e-9 and math.isfinite(res["nll"])


def test_one_line_errors(sphere_run, tmp_path, capsys):
    csv, ckpt = sphere_run
    out = tmp_path / "x"
    rc, _, err = run_cli(capsys, "train", "--manifold", "klein2", "--data", csv, "--out", out, *QUICK)
    assert_one_line_error(rc, err, "klein2", "sphere<n>", "torus<n>", "so3")
    bad = tmp_path / "bad.csv"
    bad.write_text("lat,lon\n10,20\n95,30\n")
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", bad, "--out", out, *QUICK)
    assert_one_line_error(rc, err, "latitude 95", "[-90, 90]")
    bad.write_text("lat,lon\n10,20\n40,400\n")
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", bad, "--out", out, *QUICK)
    assert_one_line_error(rc, err, "longitude 400")
    off = tmp_path / "off.npy"
    np.save(off, np.full((5, 3), 0.9, dtype=np.float32))
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", off, "--out", out, *QUICK)
    assert_one_line_error(rc, err, "not on sphere2")
    np.save(off, np.full((5, 2), 7.0, dtype=np.float32))  # angles outside [0, 2π)
    rc, _, err = run_cli(capsys, "train", "--manifold", "torus2", "--data", off, "--out", out, *QUICK)
    assert_one_line_error(rc, err, "not on torus2")
    rc, _, err = run_cli(capsys, "train", "--manifold", "torus2", "--data", csv, "--out", out, *QUICK)
    assert_one_line_error(rc, err, "sphere2", "torus2")
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--coupling", "exact-ot",
                         "--out", out, *QUICK)
    assert_one_line_error(rc, err, "exact-ot", "--manifold")
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", "moons", "--out", out, *QUICK)
    assert_one_line_error(rc, err, "moons", "volcano")
    # commands that only know flat flows refuse a manifold checkpoint cleanly
    rc, _, err = run_cli(capsys, "reflow", "--ckpt", ckpt, "--out", tmp_path / "rf")
    assert_one_line_error(rc, err, "sphere2")
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--nfe", 4)
    assert_one_line_error(rc, err, "--nfe")
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--out", tmp_path / "s.txt")
    assert_one_line_error(rc, err, ".npy")
    assert not out.exists() or not (out / "latest.json").exists()


def test_so3_from_npy_trains_and_samples_rotations(tmp_path, capsys):
    from steerflow.manifolds import SO3

    M = SO3()
    data = tmp_path / "rot.npy"
    np.save(data, M.random_base(40, torch.Generator().manual_seed(0)).numpy())
    ckpt = tmp_path / "so3"
    rc, _, err = run_cli(capsys, "train", "--manifold", "so3", "--data", data, "--steps", 10, "--out", ckpt, *QUICK)
    assert rc == 0, err
    out = tmp_path / "r.npy"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", 16, "--steps", 8, "--out", out)
    assert rc == 0, err
    x = torch.from_numpy(np.load(out))
    assert x.shape == (16, 3, 3) and float(M.residual(x).max()) < 1e-4


# --- no leakage: the checkpoint records its split, eval refuses to call trained points held out -------------

@pytest.fixture(scope="module")
def sphere_all_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sphere_all")
    csv = d / "events.csv"
    write_latlon_csv(csv, 60, seed=2)
    ckpt = d / "run"
    assert main(["train", "--manifold", "sphere2", "--data", str(csv), "--steps", "5", "--out", str(ckpt), *QUICK]) == 0
    return csv, ckpt


def test_the_split_is_reproducible_from_the_checkpoint_alone(sphere_run, sphere_all_run, tmp_path, capsys):
    csv, ckpt = sphere_run
    info = json.loads((ckpt / "run.json").read_text())
    points = load_latlon_csv(info["data"])
    assert info["split"] == "train" and info["split_seed"] == 3
    assert info["data_points"] == 60 and info["data_sha256"] == C.points_digest(points)
    # run.json alone (data, seed, digest) gives the test points eval scores
    test = C.split_points(points, "test", info["split_seed"])
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 4, "--out", tmp_path / "e.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert (res["split"], res["seed"], res["n"], res["trained_split"], res["leak"]) == ("test", 3, test.shape[0],
                                                                                       "train", False)
    info_all = json.loads((sphere_all_run[1] / "run.json").read_text())
    assert info_all["split"] == "all" and info_all["split_seed"] is None and info_all["data_points"] == 60


def test_eval_refuses_the_test_split_of_a_model_trained_on_all(sphere_all_run, tmp_path, capsys):
    csv, ckpt = sphere_all_run
    for split in ("test", "val"):
        rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--split", split, "--steps", 4)
        assert_one_line_error(rc, err, f"--split {split}", "trained on all", "--split train", "--allow-leak")
    out = tmp_path / "leak.json"
    rc, stdout, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--split", "test", "--steps", 4, "--allow-leak",
                              "--out", out)
    assert rc == 0, err
    assert "trained on these points" in stdout and "--allow-leak" in err
    res = json.loads(out.read_text())
    assert res["leak"] is True and res["trained_split"] == "all" and res["n"] == 6
    # a checkpoint from before the split was recorded trained on all its points: refused the same way
    old = json.loads((ckpt / "run.json").read_text())
    for key in ("split", "split_seed", "data_points", "data_sha256"):
        old.pop(key)
    (ckpt / "run.json").write_text(json.dumps(old))
    try:
        rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--split", "test", "--steps", 4)
        assert_one_line_error(rc, err, "trained on all", "--allow-leak")
    finally:
        (ckpt / "run.json").write_text(json.dumps({**old, "split": "all", "split_seed": None}))


def test_eval_refuses_another_seeds_split_and_other_data_under_the_same_name(sphere_run, tmp_path, capsys):
    csv, ckpt = sphere_run
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--seed", 4, "--steps", 4)
    assert_one_line_error(rc, err, "--split test", "seed 3", "--seed 4", "--allow-leak")
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--seed", 3, "--split", "val", "--steps", 4,
                         "--out", tmp_path / "v.json")
    assert rc == 0, err
    # the same file name with other contents: its split is not the held-out part of the training data
    info = json.loads((ckpt / "run.json").read_text())
    moved = tmp_path / "events.csv"
    write_latlon_csv(moved, 60, seed=7)
    info_path = ckpt / "run.json"
    original = info_path.read_text()
    info_path.write_text(json.dumps({**info, "data": str(moved)}))
    try:
        rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 4)
        assert_one_line_error(rc, err, "not the data the checkpoint was trained on", "--allow-leak")
    finally:
        info_path.write_text(original)


def test_resume_refuses_other_data_or_another_split(tmp_path, capsys):
    """Resuming on other data (or another split) would train on points the first part held out."""
    csv = tmp_path / "events.csv"
    write_latlon_csv(csv, 60, seed=5)
    out = tmp_path / "r"
    args = ["train", "--manifold", "sphere2", "--data", csv, "--split", "train", "--steps", 4, "--out", out, *QUICK]
    rc, _, err = run_cli(capsys, *args, "--seed", 1)
    assert rc == 0, err
    original = csv.read_text()
    write_latlon_csv(csv, 60, seed=6)  # the same file name, other points
    rc, _, err = run_cli(capsys, *args, "--seed", 1, "--resume")
    assert_one_line_error(rc, err, "--resume", "split train, seed 1, other data")
    csv.write_text(original)
    rc, _, err = run_cli(capsys, *args, "--seed", 2, "--resume")
    assert_one_line_error(rc, err, "--resume", "seed 1", "seed 2")


# --- safe evaluation: the whole split, in batches, points the flow does not reach ---------------------------

def test_eval_scores_the_whole_split_by_default(tmp_path, capsys):
    csv = tmp_path / "many.csv"
    write_latlon_csv(csv, 2400, seed=4)
    ckpt = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 2, "--out", ckpt, *QUICK)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 2, "--batch", 1000)
    assert rc == 0, err
    res = json.loads((ckpt / "eval.json").read_text())
    assert res["split"] == "all" and res["n"] == 2400 and res["n_nonfinite"] == 0


class _Escaping(torch.nn.Module):
    """A flow on H² whose backward solve reaches infinity from every point with ``x_1 > 0`` (see
    ``tests/test_riemannian.py``); it records the batch sizes it is called with."""

    def __init__(self, H) -> None:
        super().__init__()
        self.H, self.sizes = H, []
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        self.sizes.append(x.shape[0])
        e1 = torch.zeros_like(x)
        e1[:, 1] = 1
        r = torch.sqrt(1 + x[:, 1:2] ** 2)
        return -((x[:, 1:2] + r) / r) * self.H.proju(x, e1)


def test_eval_reports_the_points_the_flow_does_not_reach_and_scores_the_rest(tmp_path, capsys, monkeypatch):
    from steerflow.manifolds import Hyperbolic

    H = Hyperbolic(2)
    x1 = torch.tensor([-1.0, -0.5, 0.8, -0.2, 1.5, -2.0, -0.7])
    pts = H.projx(torch.stack([torch.zeros(7), x1, 0.3 * torch.ones(7)], -1))
    data = tmp_path / "h2.npy"
    np.save(data, pts.numpy())
    model = _Escaping(H)
    info = C.RunInfo(data=str(data), source="base", path="geodesic", manifold="hyperbolic2",
                     network={"name": "mlp", "config": {}}, split="all")
    monkeypatch.setattr(C, "load_flow", lambda *a, **k: C.Loaded(model=model, info=info, directory=tmp_path,
                                                                  manifold=H))
    out = tmp_path / "e.json"
    rc, stdout, err = run_cli(capsys, "eval", "--ckpt", tmp_path, "--steps", 16, "--batch", 3, "--out", out)
    assert rc == 0, err
    assert "does not reach 2 of 7 points" in err and "positions in the all split: 2, 4" in err
    assert max(model.sizes) <= 3
    res = json.loads(out.read_text())
    assert res["n"] == 7 and res["n_nonfinite"] == 2 and res["nonfinite_points"] == [2, 4]
    good = x1 < 0
    ref = manifold_log_likelihood(model, pts[good], H, steps=16)
    assert abs(res["nll"] - float(-ref.double().mean())) < 1e-6


# --- clear messages ------------------------------------------------------------------------------------------

def test_torus_angles_in_minus_pi_to_pi_are_wrapped_on_load_and_others_refused_with_the_range(tmp_path, capsys):
    rng = np.random.default_rng(1)
    signed = (np.array([1.0, -2.0]) + 0.3 * rng.standard_normal((40, 2)) + np.pi) % (2 * np.pi) - np.pi
    data = tmp_path / "signed.npy"
    np.save(data, signed.astype(np.float32))
    ckpt = tmp_path / "torus"
    rc, _, err = run_cli(capsys, "train", "--manifold", "torus2", "--data", data, "--steps", 3, "--out", ckpt, *QUICK)
    assert rc == 0, err
    assert "wrapped onto torus2's [0, 2π)" in err
    rc, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--steps", 4)
    assert rc == 0, err
    assert json.loads((ckpt / "eval.json").read_text())["n"] == 40
    np.save(data, np.degrees(signed + np.pi).astype(np.float32))  # degrees in [0, 360)
    rc, _, err = run_cli(capsys, "train", "--manifold", "torus2", "--data", data, "--out", tmp_path / "d", *QUICK)
    assert_one_line_error(rc, err, "not on torus2", "expected angles in radians in [0, 2π)", "degrees")


def test_unknown_manifold_says_expected_one_of_once(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--manifold", "klein2", "--data", "x.npy", "--out", tmp_path / "x", *QUICK)
    assert_one_line_error(rc, err, "klein2", "sphere<n>", "sphere2xtorus1")
    assert err.count("expected one of") == 1
