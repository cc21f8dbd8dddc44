"""``train --manifold sphere2 --base vmf``: the output layer starts at zero (the untrained flow is its base), and with
a validation split the run keeps the checkpoint of the lowest validation NLL (``--select val``): ``best.json`` names
it, ``run.json`` records the curve, ``load_checkpoint`` / ``eval`` use it, ``--resume`` continues from the last step,
and the trained weights are those of one uninterrupted run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_one_line_error, run_cli
from steerflow.cli import train as train_cli
from steerflow.cli.main import main
from steerflow.data.earth import load_latlon_csv, random_split
from steerflow.manifolds import Sphere, VonMisesFisherMixture
from steerflow.manifolds.velocity import build_manifold_model
from steerflow.models import build_model
from steerflow.training import load_checkpoint, load_run, save_checkpoint
from steerflow.training.checkpoint import BEST, LATEST, read_selection, select_checkpoint
from test_cli_manifold import write_latlon_csv

SEED = 3
S2 = Sphere(2)
QUICK = ["--hidden", "16", "--batch", "32", "--quiet", "--lr", "1e-2", "--ema", "0.5"]
STEPS = ["--steps", "8", "--ckpt-every", "2"]


def train_args(csv, out, *extra):
    return ["train", "--manifold", "sphere2", "--data", str(csv), "--split", "train", "--seed", str(SEED),
            "--base", "vmf", "--out", str(out), *QUICK, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("select")
    csv = d / "events.csv"
    write_latlon_csv(csv, 60)
    for name, extra in (("val", []), ("last", ["--select", "last"])):
        assert main(train_args(csv, d / name, *STEPS, *extra)) == 0
    return csv, d


def split_parts(csv):
    return random_split(load_latlon_csv(csv), (0.8, 0.1, 0.1), generator=torch.Generator().manual_seed(SEED))


def weights(folder, name="ema.safetensors"):
    return load_file(str(folder / name))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_output_layer_starts_at_zero_so_step_0_scores_the_base_alone(runs):
    csv, d = runs
    _, val, _ = split_parts(csv)
    base = VonMisesFisherMixture.load(d / "val")
    curve = json.loads((d / "val" / "run.json").read_text())["selection"]["val_nll"]
    # v ≡ 0: the backward solve leaves each point where it is and adds no divergence
    assert curve["0"] == float(-base.log_prob(val).double().mean())
    assert abs(curve["0"] - float(-base.log_prob(val.double()).mean())) < 1e-6
    # only the output layer is zeroed: the others keep their initialisation
    model = build_manifold_model(S2, {"name": "mlp", "config": {"dim": 3, "hidden": 16}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_cli.zero_output_layer(model)
    out = f"model.net.{len(model.model.net) - 1}."
    after = model.state_dict()
    assert {k for k in before if k.startswith(out)} == {out + "weight", out + "bias"}
    assert all(not after[k].any() if k.startswith(out) else torch.equal(after[k], before[k]) for k in before)
    x = S2.random_base(5, torch.Generator().manual_seed(0))
    assert not model(x, torch.full((5,), 0.3)).any()


def test_the_kept_step_has_the_lowest_recorded_validation_nll_and_is_what_loads(runs):
    csv, d = runs
    run = d / "val"
    info = json.loads((run / "run.json").read_text())["selection"]
    curve = {int(k): v for k, v in info["val_nll"].items()}
    assert sorted(curve) == [0, 2, 4, 6, 8] and info["weights"] == "ema" and info["metric"] == "val_nll"
    k = info["selected_step"]
    assert curve[k] == min(curve.values())
    pointer = read_selection(run)
    assert pointer["step"] == k and pointer["scores"] == curve
    assert json.loads((run / LATEST).read_text())["step"] == 8  # the last step is still the one to resume from
    ckpt, last = load_checkpoint(run), load_checkpoint(run, latest=True)
    assert ckpt.step == k and last.step == 8
    if k != 8:
        assert not same(ckpt.ema_model.state_dict(), last.ema_model.state_dict())
    # the recorded value is the validation NLL of the weights that load (and of the last ones)
    _, val, _ = split_parts(csv)
    score = train_cli.validation_nll(val, S2, VonMisesFisherMixture.load(run).log_prob)
    assert score(ckpt.ema_model) == curve[k] and score(last.ema_model) == curve[8]
    # load_run (sample, eval, plot) takes the selected checkpoint's weights
    assert same(load_run(run).model.state_dict(), ckpt.ema_model.state_dict())
    assert same(load_run(run, latest=True).model.state_dict(), last.ema_model.state_dict())
    # from_pretrained of the run folder follows the same pointer
    from steerflow.models import from_pretrained

    assert same(from_pretrained(run).state_dict(), ckpt.ema_model.state_dict())
    # only the selected and the last folders are kept
    assert {p.name for p in run.glob("step-*")} == {f"step-{k:08d}", "step-00000008"}


def test_training_in_parts_gives_the_uninterrupted_run(runs):
    _, d = runs
    assert not (d / "last" / BEST).exists() and json.loads((d / "last" / "run.json").read_text())["selection"] is None
    assert load_checkpoint(d / "last").step == 8
    for name in ("model.safetensors", "ema.safetensors"):
        assert same(weights(d / "val" / "step-00000008", name), weights(d / "last" / "step-00000008", name))
    logs = [[(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (d / name / "log.jsonl").read_text().splitlines())]
            for name in ("val", "last")]
    assert logs[0] == logs[1] and logs[0][-1][0] == 8


@pytest.mark.parametrize("kill", ["after the score", "before the score"])
def test_resume_continues_from_the_last_step_with_the_scores_so_far(runs, kill, tmp_path, monkeypatch):
    csv, d = runs
    from steerflow.training import checkpoint as ck

    original = ck.select_checkpoint

    def killed_at_step_4(out, scores, **kw):
        if max(scores) == 4:
            if kill == "after the score":
                original(out, scores, **kw)
            raise KeyboardInterrupt
        return original(out, scores, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(ck, "select_checkpoint", killed_at_step_4)
    assert main(train_args(csv, run, *STEPS)) != 0  # (the command line reports the interrupt)
    monkeypatch.setattr(ck, "select_checkpoint", original)
    assert json.loads((run / LATEST).read_text())["step"] == 4
    assert sorted(read_selection(run)["scores"]) == ([0, 2, 4] if kill == "after the score" else [0, 2])
    assert main(train_args(csv, run, *STEPS, "--resume")) == 0
    want = json.loads((d / "val" / "run.json").read_text())["selection"]
    assert json.loads((run / "run.json").read_text())["selection"] == want
    for name in ("model.safetensors", "ema.safetensors"):
        assert same(weights(run / "step-00000008", name), weights(d / "val" / "step-00000008", name))
    k = want["selected_step"]
    assert same(weights(run / f"step-{k:08d}"), weights(d / "val" / f"step-{k:08d}"))


def test_an_untrained_selected_flow_scores_exactly_as_its_base(runs, tmp_path, capsys):
    csv, _ = runs
    run = tmp_path / "wild"  # a learning rate that throws the flow off: the untrained flow (step 0) is kept
    rc, _, err = run_cli(capsys, *train_args(csv, run, "--steps", "4", "--ckpt-every", "2", "--lr", "3", "--ema", "0"))
    assert rc == 0, err
    sel = json.loads((run / "run.json").read_text())["selection"]
    assert sel["selected_step"] == 0 and sel["weights"] == "model"
    ckpt = load_checkpoint(run)
    assert ckpt.step == 0 and ckpt.path.name == "step-00000000"
    assert not ckpt.model.model.net[-1].weight.any() and not ckpt.model.model.net[-1].bias.any()
    assert load_checkpoint(run, latest=True).step == 4
    rc, stdout, err = run_cli(capsys, "eval", "--ckpt", run, "--steps", 4, "--out", tmp_path / "e.json", "--quiet")
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["selected_step"] == 0 and "step 0 kept on validation" in stdout  # eval names the checkpoint it scored
    _, _, test = split_parts(csv)
    base = VonMisesFisherMixture.load(run)
    assert res["nll"] == float(-base.log_prob(test).double().mean())
    assert abs(res["nll"] - res["base_nll"]) < 1e-6


def test_uniform_and_split_all_runs_keep_their_last_step(runs, tmp_path, capsys):
    csv, _ = runs
    for name, argv in (("uniform", ["--split", "train"]), ("all", ["--base", "vmf"])):
        out = tmp_path / name
        rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", csv, *argv, "--steps", 4,
                             "--ckpt-every", 2, "--out", out, *QUICK)
        assert rc == 0, err
        assert not (out / BEST).exists() and json.loads((out / "run.json").read_text())["selection"] is None
        assert load_checkpoint(out).step == 4 and [p.name for p in out.glob("step-*")] == ["step-00000004"]


@pytest.mark.parametrize("argv, fragments", [
    (["--manifold", "sphere2", "--data", "volcano", "--base", "vmf", "--select", "val"],
     ["--select val", "--split train", "--split all"]),
    (["--data", "moons", "--select", "val"], ["--select", "--manifold"]),
])
def test_select_misuse_is_one_line(argv, fragments, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", *argv, "--steps", 2, "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(rc, err, *fragments)
    assert not (tmp_path / "r").exists()


def test_resume_refuses_another_select(runs, tmp_path, capsys):
    import shutil

    csv, d = runs
    run = tmp_path / "run"
    shutil.copytree(d / "val", run)
    rc, _, err = run_cli(capsys, *train_args(csv, run, *STEPS, "--resume", "--select", "last"))
    assert_one_line_error(rc, err, "--resume", "--select val", "--select last")


def test_select_checkpoint_points_best_json_at_the_lowest_score_and_spares_its_folder(tmp_path):
    net = build_model("mlp", dim=2, hidden=4)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, net, config={}, step=step)
        if step == 1:
            assert select_checkpoint(tmp_path, {1: 0.5}, metric="m") == 1
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001", "step-00000003"]
    assert select_checkpoint(tmp_path, {1: 0.5, 2: float("nan"), 3: 0.5}, metric="m") == 1  # ties: earliest
    sel = read_selection(tmp_path)
    assert sel["scores"] == {1: 0.5, 2: math.inf, 3: 0.5} and sel["checkpoint"] == "step-00000001"
    assert load_checkpoint(tmp_path).step == 1 and load_checkpoint(tmp_path, latest=True).step == 3
    with pytest.raises(FileNotFoundError, match="step-00000002"):
        select_checkpoint(tmp_path, {2: 0.1}, metric="m")
    save_checkpoint(tmp_path, net, config={}, step=0, update_latest=False)
    assert json.loads((tmp_path / LATEST).read_text())["step"] == 3
    assert select_checkpoint(tmp_path, {0: 0.1, 3: 0.5}, metric="m") == 0
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000000", "step-00000003"]
