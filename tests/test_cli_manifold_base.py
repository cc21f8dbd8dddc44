"""A fitted von Mises–Fisher-mixture source through the command line: ``train --manifold sphere2 --base vmf`` fits
and saves it (``base.json`` + ``base.safetensors``, recorded in ``run.json``); ``sample``, ``eval`` and ``plot`` use
it with nothing else to pass; ``load_run`` / ``load_checkpoint`` expose it as ``.base``; runs without one behave as
before; misuse and broken files end with one line."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from test_cli_manifold import write_latlon_csv
from steerflow.cli import _common as C
from steerflow.cli.main import main
from steerflow.data.earth import load_latlon_csv, random_split
from steerflow.manifolds import Sphere, VonMisesFisherMixture, manifold_log_likelihood
from steerflow.manifolds.vmf import DEFAULT_COMPONENTS
from steerflow.training import load_checkpoint, load_run

QUICK = ["--hidden", "16", "--batch", "32", "--quiet"]
SEED = 3
S2 = Sphere(2)


def same_mixture(a: VonMisesFisherMixture, b: VonMisesFisherMixture) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.means, b.means), (a.kappas, b.kappas), (a.weights, b.weights)))


def zero_weights(run) -> None:
    """Set every weight of the run's checkpoint (raw and EMA) to zero: the velocity is then 0 everywhere."""
    from safetensors.torch import load_file, save_file

    step = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    for name in ("model.safetensors", "ema.safetensors"):
        tensors = load_file(str(step / name))
        save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(step / name),
                  metadata={"format": "steerflow.checkpoint"})


@pytest.fixture(scope="module")
def vmf_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("vmf")
    csv = d / "events.csv"
    write_latlon_csv(csv, 60)
    run = d / "run"
    rc = main(["train", "--manifold", "sphere2", "--data", str(csv), "--split", "train", "--seed", str(SEED),
               "--steps", "30", "--base", "vmf", "--out", str(run), *QUICK])
    assert rc == 0
    return csv, run


def splits(csv):
    return random_split(load_latlon_csv(csv), (0.8, 0.1, 0.1), generator=torch.Generator().manual_seed(SEED))


def test_the_base_is_fitted_on_train_chosen_on_val_saved_and_reloaded_bit_for_bit(vmf_run):
    csv, run = vmf_run
    info = json.loads((run / "run.json").read_text())
    rec = info["base"]
    assert rec["name"] == "vmf" and rec["file"] == "base.json" and rec["chosen_on"] == "val"
    assert rec["candidates"] == {"components": list(DEFAULT_COMPONENTS), "kappa_max": [1e4]}
    # the same choice made by hand: EM on the 48 training points, K (capped at 48) by validation NLL
    train, val, _ = splits(csv)
    mix, sel = VonMisesFisherMixture.fit_em_select(train, val, DEFAULT_COMPONENTS, (1e4,), seed=SEED)
    assert (rec["components"], rec["kappa_max"], rec["fitted_components"]) == (sel.components, 1e4, len(mix))
    assert rec["held_out_nll"] == sel.held_out_nll
    saved = VonMisesFisherMixture.load(run)
    assert same_mixture(saved, mix)
    assert saved.means.dtype == torch.float64
    # the library loaders expose the same mixture
    assert same_mixture(load_run(run).base, mix)
    assert same_mixture(load_checkpoint(run).base, mix)
    assert same_mixture(load_checkpoint(next(run.glob("step-*"))).base, mix)  # a step folder finds its run's base


def test_save_load_round_trip_is_exact_and_refuses_other_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    mix = VonMisesFisherMixture(torch.randn(7, 3, generator=g) * 3.7, torch.rand(7, generator=g) * 50,
                                torch.rand(7, generator=g) + 0.1)
    mix.save(tmp_path, "m")
    back = VonMisesFisherMixture.load(tmp_path, "m")
    assert same_mixture(back, mix)
    x = S2.random_base(100, g, dtype=torch.float64)
    assert torch.equal(back.log_prob(x), mix.log_prob(x))
    from safetensors.torch import save_file

    save_file({"means": mix.means, "kappas": mix.kappas[0], "weights": mix.weights}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="kappas"):  # one κ for all would be a different file format
        VonMisesFisherMixture.load(tmp_path, "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, "class": "SomethingElse"}))
    with pytest.raises(ValueError, match="SomethingElse"):
        VonMisesFisherMixture.load(tmp_path, "m")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        VonMisesFisherMixture.load(tmp_path, "nothing")


def test_fit_em_select_keeps_the_candidate_with_the_lowest_held_out_nll():
    g = torch.Generator().manual_seed(1)
    truth = VonMisesFisherMixture(torch.eye(3), torch.tensor([40.0, 20.0, 80.0]))
    train, held = truth.sample(300, g, dtype=torch.float64), truth.sample(100, g, dtype=torch.float64)
    mix, sel = VonMisesFisherMixture.fit_em_select(train, held, (1, 3, 500), (5.0, 1e4), seed=2)
    assert sel.candidates == ((1, 5.0), (1, 1e4), (3, 5.0), (3, 1e4), (300, 5.0), (300, 1e4))  # 500 capped at 300
    scores = {}
    for k, cap in sel.candidates:
        m = VonMisesFisherMixture.fit_em(train, k, iters=100, kappa_max=cap, generator=torch.Generator().manual_seed(2))
        scores[k, cap] = float(-m.log_prob(held).mean())
    assert (sel.components, sel.kappa_max) == min(scores, key=scores.get)
    assert sel.held_out_nll == min(scores.values()) and len(mix) == sel.fitted and sel.chosen_on == "held_out"
    assert (sel.components, sel.kappa_max) == (3, 1e4)  # three well-separated components, κ up to 80
    # without held-out points: one candidate is fitted as it is; several are chosen on a slice, then refitted
    one, sel1 = VonMisesFisherMixture.fit_em_select(train, None, (3,), (1e4,), seed=2)
    assert sel1.chosen_on is None and sel1.held_out_nll is None
    by_hand = VonMisesFisherMixture.fit_em(train, 3, iters=100, generator=torch.Generator().manual_seed(2))
    assert same_mixture(one, by_hand)
    mix2, sel2 = VonMisesFisherMixture.fit_em_select(train, None, (1, 3), (1e4,), seed=2, held_out_fraction=0.2)
    assert sel2.chosen_on == "train_slice" and (sel2.components, sel2.kappa_max) == (3, 1e4)
    assert same_mixture(mix2, one)
    with pytest.raises(ValueError, match="held_out_fraction"):
        VonMisesFisherMixture.fit_em_select(train, None, (1, 3), held_out_fraction=1.0)


def test_eval_scores_with_the_saved_base(vmf_run, tmp_path, capsys):
    csv, run = vmf_run
    out = tmp_path / "eval.json"
    rc, stdout, err = run_cli(capsys, "eval", "--ckpt", run, "--steps", 8, "--out", out, "--quiet")
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["split"] == "test" and res["n"] == 6 and res["base"] == "vmf"
    _, _, test = splits(csv)
    loaded = load_run(run)
    base = VonMisesFisherMixture.load(run)
    with torch.no_grad():
        logp = manifold_log_likelihood(loaded.model, test, S2, method="rk4", steps=8, base_log_prob=base.log_prob)
        uniform = manifold_log_likelihood(loaded.model, test, S2, method="rk4", steps=8)
    assert abs(res["nll"] - float(-logp.double().mean())) < 1e-6
    assert abs(res["base_nll"] - float(-base.log_prob(test.double()).mean())) < 1e-12
    assert abs(res["nll"] - float(-uniform.double().mean())) > 1e-3  # (the base term is not the uniform one)
    assert "fitted base alone (vMF mixture" in stdout


def test_samples_lie_on_the_sphere_and_start_from_the_base(vmf_run, tmp_path, capsys):
    _, run = vmf_run
    out = tmp_path / "s.npy"
    rc, _, err = run_cli(capsys, "sample", "--ckpt", run, "--n", 300, "--steps", 10, "--seed", 5, "--out", out,
                         "--quiet")
    assert rc == 0, err
    x = np.load(out)
    assert x.shape == (300, 3) and np.abs(np.linalg.norm(x, axis=1) - 1).max() < 1e-5
    # with a zero velocity the flow is the identity: the samples are the base's draws under the same generator
    zero = tmp_path / "zero"
    shutil.copytree(run, zero)
    zero_weights(zero)
    rc, _, err = run_cli(capsys, "sample", "--ckpt", zero, "--n", 300, "--steps", 4, "--seed", 5, "--out", out,
                         "--quiet")
    assert rc == 0, err
    drawn = VonMisesFisherMixture.load(run).sample(300, torch.Generator().manual_seed(5)).numpy()
    assert np.abs(np.load(out) - drawn).max() < 1e-6
    # ... and its density is the base's: the test NLL equals the base's own
    rc, _, err = run_cli(capsys, "eval", "--ckpt", zero, "--steps", 4, "--out", tmp_path / "e.json", "--quiet")
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert abs(res["nll"] - res["base_nll"]) < 1e-5 and abs(res["base_nll"] - math.log(4 * math.pi)) > 0.1
    # the same run without its base (as runs before fitted bases) draws from the uniform base as before
    (zero / "base.json").unlink()
    (zero / "base.safetensors").unlink()
    info = json.loads((zero / "run.json").read_text())
    del info["base"]
    (zero / "run.json").write_text(json.dumps(info))
    assert load_run(zero).base is None and load_checkpoint(zero).base is None
    rc, _, err = run_cli(capsys, "sample", "--ckpt", zero, "--n", 300, "--steps", 4, "--seed", 5, "--out", out,
                         "--quiet")
    assert rc == 0, err
    uniform = S2.random_base(300, torch.Generator().manual_seed(5)).numpy()
    assert np.abs(np.load(out) - uniform).max() < 1e-6


def test_plot_uses_the_base(vmf_run, tmp_path, capsys):
    from steerflow.cli.plot import _density_grid

    _, run = vmf_run
    png = tmp_path / "map.png"
    rc, _, err = run_cli(capsys, "plot", "--ckpt", run, "--n", 100, "--steps", 8, "--out", png)
    assert rc == 0 and png.stat().st_size > 1000, err
    loaded = C.load_flow(run, allow_manifold=True)
    lon, lat, logp = _density_grid(loaded, n_lat=3, n_lon=4)
    x = torch.stack([torch.cos(torch.tensor(lat)) * torch.cos(torch.tensor(lon)),
                     torch.cos(torch.tensor(lat)) * torch.sin(torch.tensor(lon)),
                     torch.sin(torch.tensor(lat))], -1).reshape(-1, 3).float()
    ref = manifold_log_likelihood(loaded.model, x, S2, method="rk4", steps=24, base_log_prob=loaded.base.log_prob)
    assert np.abs(logp.reshape(-1) - ref.numpy()).max() < 1e-6


def test_split_all_chooses_k_on_a_held_out_slice_then_fits_all_points(tmp_path, capsys):
    csv = tmp_path / "e.csv"
    write_latlon_csv(csv, 40, seed=2)
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 2, "--seed", 1,
                         "--base", "vmf", "--base-components", 2, 5, "--base-kappa-max", 50, 1e4, "--out", run, *QUICK)
    assert rc == 0, err
    rec = json.loads((run / "run.json").read_text())["base"]
    x = load_latlon_csv(csv)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))  # 4 of the 40 points held out
    _, sel = VonMisesFisherMixture.fit_em_select(x[perm[4:]], x[perm[:4]], (2, 5), (50, 1e4), seed=1)
    assert (rec["components"], rec["kappa_max"], rec["held_out_nll"]) == (sel.components, sel.kappa_max,
                                                                          sel.held_out_nll)
    assert rec["chosen_on"].startswith("10% of the training points")
    refit = VonMisesFisherMixture.fit_em(x, sel.components, iters=100, kappa_max=sel.kappa_max,
                                         generator=torch.Generator().manual_seed(1))
    assert same_mixture(VonMisesFisherMixture.load(run), refit)
    # one candidate: fitted on every point, nothing held out
    run1 = tmp_path / "run1"
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 2, "--seed", 1,
                         "--base", "vmf", "--base-components", 4, "--out", run1, *QUICK)
    assert rc == 0, err
    rec = json.loads((run1 / "run.json").read_text())["base"]
    assert rec["chosen_on"] is None and rec["held_out_nll"] is None and rec["components"] == 4
    one = VonMisesFisherMixture.fit_em(x, 4, iters=100, kappa_max=1e4, generator=torch.Generator().manual_seed(1))
    assert same_mixture(VonMisesFisherMixture.load(run1), one)
    # --resume keeps the saved base; another --base is refused
    saved = (run1 / "base.safetensors").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 2, "--seed", 1,
                         "--base", "vmf", "--base-components", 4, "--out", run1, "--resume", *QUICK)
    assert rc == 0, err
    assert (run1 / "base.safetensors").read_bytes() == saved
    assert json.loads((run1 / "run.json").read_text())["base"]["components"] == 4
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 2, "--seed", 1,
                         "--out", run1, "--resume", *QUICK)
    assert_one_line_error(rc, err, "--resume", "--base vmf", "--base uniform")


@pytest.mark.parametrize("argv, fragments", [
    (["--data", "moons", "--base", "vmf"], ["--base vmf", "--manifold sphere2"]),
    (["--manifold", "torus2", "--data", "x.npy", "--base", "vmf"], ["--base vmf", "sphere2", "torus2"]),
    (["--manifold", "sphere2", "--data", "volcano", "--base-components", "3"], ["--base-components", "--base vmf"]),
    (["--manifold", "sphere2", "--data", "volcano", "--base-kappa-max", "10"], ["--base-kappa-max", "--base vmf"]),
])
def test_train_refuses_a_vmf_base_off_the_sphere(argv, fragments, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", *argv, "--steps", 2, "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(rc, err, *fragments)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage, fragments", [
    ("missing json", ["incomplete checkpoint", "records a fitted base", "base.json"]),
    ("missing tensors", ["incomplete checkpoint", "base.safetensors"]),
    ("corrupt tensors", ["cannot load checkpoint", "corrupt", "base.safetensors"]),
    ("corrupt json", ["cannot load checkpoint", "corrupt", "base.json"]),
    ("wrong tensors", ["cannot load checkpoint", "corrupt", "base.safetensors", "means"]),
])
def test_a_missing_or_corrupt_base_is_one_line(vmf_run, damage, fragments, tmp_path, capsys):
    from safetensors.torch import save_file

    _, run = vmf_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    if damage == "missing json":
        (bad / "base.json").unlink()
    elif damage == "missing tensors":
        (bad / "base.safetensors").unlink()
    elif damage == "corrupt tensors":
        (bad / "base.safetensors").write_bytes((run / "base.safetensors").read_bytes()[:40])
    elif damage == "corrupt json":
        (bad / "base.json").write_text("{")
    else:
        save_file({"means": torch.zeros(2, 3)}, str(bad / "base.safetensors"))
    for command in (["sample", "--out", tmp_path / "s.npy"], ["eval"], ["plot", "--out", tmp_path / "p.png"]):
        rc, _, err = run_cli(capsys, command[0], "--ckpt", bad, *command[1:])
        assert_one_line_error(rc, err, *fragments)


def test_load_run_names_the_missing_base(vmf_run, tmp_path):
    _, run = vmf_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match="records a fitted base"):
        load_run(bad)
    assert math.isfinite(float(load_run(run).base.log_prob(S2.random_base(4)).sum()))


def test_run_json_decides_whether_a_run_has_a_base(vmf_run, tmp_path, capsys):
    csv, run = vmf_run
    # a fresh uniform run into a folder left with a killed attempt's base does not keep it
    out = tmp_path / "uniform"
    out.mkdir()
    shutil.copy(run / "base.json", out / "base.json")
    shutil.copy(run / "base.safetensors", out / "base.safetensors")
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, "--steps", 2, "--out", out, *QUICK)
    assert rc == 0, err
    assert not (out / "base.json").exists() and not (out / "base.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["base"] is None and load_run(out).base is None
    # base files beside a run.json that records no base are not that run's source
    shutil.copy(run / "base.json", out / "base.json")
    shutil.copy(run / "base.safetensors", out / "base.safetensors")
    assert load_run(out).base is None
