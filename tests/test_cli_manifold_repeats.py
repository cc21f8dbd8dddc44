"""``train --manifold sphere2 --base vmf --repeats``: a component at every distinct training site around a flow
trained on the distinct sites (``RepeatedSites``); the weight chosen on validation with the kept checkpoint, saved as
``sites.json`` + ``sites.safetensors`` and used by ``eval``, ``sample`` and ``plot``; misuse ends with one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from steerflow.cli import _common as C
from steerflow.cli.main import main
from steerflow.cli.train import VAL_ODE
from steerflow.data.earth import load_latlon_csv, random_split
from steerflow.manifolds import RepeatedSites, Sphere, VonMisesFisherMixture, manifold_log_likelihood
from steerflow.training import load_run

QUICK = ["--hidden", "16", "--batch", "32", "--quiet"]
SEED = 3
S2 = Sphere(2)


def write_catalogue(path, n_sites: int = 50, n_repeats: int = 40, seed: int = 0) -> None:
    """``n_sites`` distinct events in two clusters, then ``n_repeats`` events at the coordinates of the first ten
    (the same text, so the same point), in random order."""
    rng = np.random.default_rng(seed)
    centres = np.array([[64.0, -19.0], [-39.0, 175.0]])
    c = centres[rng.integers(0, 2, n_sites)]
    lat = np.clip(c[:, 0] + 8 * rng.standard_normal(n_sites), -89.9, 89.9)
    lon = (c[:, 1] + 8 * rng.standard_normal(n_sites) + 180.0) % 360.0 - 180.0
    rows = [f"{a:.2f},{b:.2f}" for a, b in zip(lat, lon)]
    rows += [rows[i] for i in rng.integers(0, 10, n_repeats)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    path.write_text("lat,lon\n" + "\n".join(rows) + "\n")


def rec_weight(run) -> float:
    """The sites' weight ``run.json`` records."""
    return json.loads((run / "run.json").read_text())["base"]["sites"]["weight"]


def splits(csv):
    return random_split(load_latlon_csv(csv), (0.8, 0.1, 0.1), generator=torch.Generator().manual_seed(SEED))


@pytest.fixture(scope="module")
def sites_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sites")
    csv = d / "events.csv"
    write_catalogue(csv)
    run = d / "run"
    rc = main(["train", "--manifold", "sphere2", "--data", str(csv), "--split", "train", "--seed", str(SEED),
               "--steps", "20", "--ckpt-every", "10", "--base", "vmf", "--base-components", "3", "10",
               "--repeats", "--out", str(run), *QUICK])
    assert rc == 0
    return csv, run


def test_sites_base_and_weight_are_the_documented_choices(sites_run):
    csv, run = sites_run
    train, val, _ = splits(csv)
    sites = RepeatedSites.from_points(train)
    assert len(sites) < train.shape[0]                        # the catalogue repeats some sites
    rec = json.loads((run / "run.json").read_text())["base"]
    assert rec["repeats"] is True and rec["sites"]["sites"] == len(sites) and rec["sites"]["events"] == 72
    saved = RepeatedSites.load(run)
    assert torch.equal(saved.sites, sites.sites) and torch.equal(saved.counts, sites.counts)
    # the base: EM on the distinct sites, chosen on the validation points that repeat no training site
    new = val[~sites.repeats(val)]
    assert 0 < new.shape[0] < val.shape[0]
    mix, sel = VonMisesFisherMixture.fit_em_select(sites.sites.float(), new, (3, 10), (1e4,), seed=SEED)
    base = VonMisesFisherMixture.load(run)
    assert torch.equal(base.means, mix.means) and rec["components"] == sel.components
    # (λ, d): the choice on validation with the kept weights (the ones load_run gives)
    loaded = load_run(run)
    with torch.no_grad():
        q = manifold_log_likelihood(loaded.model, val, S2, base_log_prob=base.log_prob, **VAL_ODE)
    chosen, nll = sites.select(val, q)
    assert (saved.weight, saved.discount) == (chosen.weight, chosen.discount) and saved.weight > 0
    assert loaded.sites is not None and loaded.sites.weight == saved.weight
    kept = json.loads((run / "run.json").read_text())["selection"]
    assert abs(kept["val_nll"][str(kept["selected_step"])] - nll) < 1e-9


def test_eval_scores_the_sites_and_the_flow_together(sites_run, tmp_path, capsys):
    csv, run = sites_run
    out = tmp_path / "eval.json"
    rc, stdout, err = run_cli(capsys, "eval", "--ckpt", run, "--steps", 8, "--out", out, "--quiet")
    assert rc == 0, err
    res = json.loads(out.read_text())
    _, _, test = splits(csv)
    loaded = load_run(run)
    with torch.no_grad():
        q = manifold_log_likelihood(loaded.model, test, S2, method="rk4", steps=8, base_log_prob=loaded.base.log_prob)
    logp = loaded.sites.log_prob(test, q)
    assert abs(res["nll"] - float(-logp.mean())) < 1e-9
    assert abs(res["base_nll"] - float(-loaded.sites.log_prob(test, loaded.base.log_prob(test.double())).mean())) < 1e-9
    at = loaded.sites.repeats(test)
    parts = res["sites"]["parts"]
    assert parts["at a training site"]["n"] == int(at.sum()) > 0
    assert abs(parts["at a training site"]["nll"] - float(-logp[at].mean())) < 1e-9
    assert "repeated sites" in stdout and "at a training site" in stdout


def test_samples_come_from_the_sites_with_their_weight(sites_run, tmp_path, capsys):
    _, run = sites_run
    out = tmp_path / "s.npy"
    n = 400
    rc, _, err = run_cli(capsys, "sample", "--ckpt", run, "--n", n, "--steps", 6, "--seed", 2, "--out", out, "--quiet")
    assert rc == 0, err
    x = torch.from_numpy(np.load(out)).double()
    assert x.shape == (n, 3) and (x.norm(dim=1) - 1).abs().max() < 1e-5
    sites = RepeatedSites.load(run)
    share = float(sites.repeats(x, tol=1e-3).double().mean())
    assert abs(share - sites.weight) < 4 * (sites.weight * (1 - sites.weight) / n) ** 0.5 + 0.02
    rc, _, err = run_cli(capsys, "sample", "--ckpt", run, "--n", n, "--steps", 6, "--seed", 2,
                         "--out", tmp_path / "t.npy", "--quiet")
    assert rc == 0 and np.array_equal(np.load(out), np.load(tmp_path / "t.npy")), err


def test_plot_density_includes_the_sites(sites_run, tmp_path, capsys):
    from steerflow.cli.plot import _density_grid

    _, run = sites_run
    png = tmp_path / "map.png"
    rc, _, err = run_cli(capsys, "plot", "--ckpt", run, "--kind", "density", "--map", "--out", png)
    assert rc == 0 and png.stat().st_size > 1000, err
    loaded = C.load_flow(run, allow_manifold=True)
    _, _, with_sites = _density_grid(loaded, n_lat=3, n_lon=4)
    loaded.sites = None
    _, _, flow_only = _density_grid(loaded, n_lat=3, n_lon=4)
    # far from every site the sites add nothing: the flow's density times (1 − λ)
    lam = RepeatedSites.load(run).weight
    assert np.abs(with_sites - flow_only - np.log1p(-lam)).max() < 1e-6


@pytest.mark.parametrize("extra, fragments", [
    (["--split", "train"], ["--repeats", "--base vmf"]),
    (["--base", "vmf"], ["--repeats", "--split train"]),
])
def test_repeats_misuse_is_one_line(extra, fragments, tmp_path, capsys):
    csv = tmp_path / "e.csv"
    write_catalogue(csv)
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--repeats", *extra,
                         "--steps", 2, "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(rc, err, *fragments)
    assert not (tmp_path / "r").exists()


def test_resume_keeps_the_repeats_option(sites_run, tmp_path, capsys):
    csv, run = sites_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    RepeatedSites.load(copy).with_weight(0.05).save(copy)  # a stale choice, as after a killed run
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--split", "train", "--seed", SEED,
                         "--steps", 20, "--ckpt-every", 10, "--base", "vmf", "--base-components", 3, 10,
                         "--out", copy, "--resume", *QUICK)
    assert_one_line_error(rc, err, "--resume", "--repeats")
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--split", "train", "--seed", SEED,
                         "--steps", 20, "--ckpt-every", 10, "--base", "vmf", "--base-components", 3, 10,
                         "--repeats", "--out", copy, "--resume", *QUICK)
    assert rc == 0, err
    # the resumed run chose (λ, d) again for its kept weights: a stale sites.json is replaced by the same choice
    # as the original run's, and run.json records it
    assert rec_weight(copy) == RepeatedSites.load(copy).weight == RepeatedSites.load(run).weight != 0.05


@pytest.mark.parametrize("damage, fragments", [
    ("missing json", ["incomplete checkpoint", "sites.json"]),
    ("corrupt tensors", ["cannot load checkpoint", "corrupt", "sites.safetensors"]),
])
def test_a_missing_or_corrupt_sites_file_is_one_line(sites_run, damage, fragments, tmp_path, capsys):
    _, run = sites_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    if damage == "missing json":
        (bad / "sites.json").unlink()
    else:
        (bad / "sites.safetensors").write_bytes((run / "sites.safetensors").read_bytes()[:40])
    rc, _, err = run_cli(capsys, "eval", "--ckpt", bad)
    assert_one_line_error(rc, err, *fragments)
