"""Smoke run of the 32×32 image-steering benchmark (benchmarks/bench_steering_images.py --quick)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("skimage")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_steering_images.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_steering_images", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_run_writes_every_cell_with_finite_figures(tmp_path):
    bench = _load_bench()
    out = tmp_path / "res" / "steering_images"
    assert bench.main(["--quick", "--ckpt", str(tmp_path / "flow"), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").exists()
    assert (out.parent / res["grid_png"]).exists()
    assert (out.parent / res["unguided_quality"]["samples_png"]).exists()
    assert res["tasks"] == list(bench.QUICK_TASKS)
    from steerflow.steering.tasks import INVERSE_METHODS

    assert res["methods"] == list(INVERSE_METHODS)
    assert res["training"]["command"].startswith("steerflow train --data photos32 --model unet")
    assert res["training"]["wall_seconds"] > 0 and res["training"]["cached"] is False
    q = res["unguided_quality"]
    for k in ("energy_distance_samples_vs_test", "energy_distance_val_vs_test", "energy_distance_train_vs_test"):
        assert math.isfinite(q[k]) and q[k] >= 0
    n = res["config"]["n_test"]
    for task in res["tasks"]:
        for noise in res["noises"]:
            rows = res["cells"][f"{task}@{noise}"]
            assert set(rows) == set(res["methods"])
            for m, r in rows.items():
                assert len(r["psnr_per_image"]) == n and len(r["ssim_per_image"]) == n
                for k in ("psnr", "psnr_se", "ssim", "ssim_se", "seconds_per_image", "peak_bytes_per_image",
                          "time_vs_unguided", "memory_vs_unguided"):
                    assert r[k] is not None and math.isfinite(r[k]), (task, noise, m, k)
                assert r["psnr_se"] > 0 and r["ssim_se"] > 0 and r["nfe"] == res["config"]["steps"]
                # the standard error is s / √n of the per-image values
                mean, se = bench.mean_se(r["psnr_per_image"])
                assert mean == pytest.approx(r["psnr"]) and se == pytest.approx(r["psnr_se"])
            assert rows["unguided"]["time_vs_unguided"] == 1.0 and rows["unguided"]["vjp"] == 0
            assert rows["dps"]["vjp"] > 0 and rows["flowchef"]["vjp"] == 0
            for m in bench.TUNE_GRID:
                if m in res["methods"]:
                    assert res["strength"][task][m] in bench.TUNE_GRID[m]
    # --merge keeps the tasks that a later run does not rerun (and refuses other settings)
    import argparse

    import torch

    args = argparse.Namespace(**res["config"])
    cells = {f"denoise@{noise}": {"marker": noise} for noise in res["noises"]}
    rows = {"denoise": torch.zeros(2 + len(res["methods"]), 1, 32, 32)}
    tasks, chosen, _ = bench.merge_previous(out, args, res["methods"], ["denoise"], cells, {"denoise": {}},
                                            {"denoise": {}}, rows, out.with_name(out.name + "_grid_rows.pt"))
    assert tasks == ["box", "sr4", "denoise"] and set(rows) == {"box", "sr4", "denoise"}
    assert cells["box@0.01"] == res["cells"]["box@0.01"] and cells["denoise@0.05"] == {"marker": 0.05}
    assert chosen["sr4"] == res["strength"]["sr4"]
    args.steps += 1
    with pytest.raises(SystemExit, match="steps"):
        bench.merge_previous(out, args, res["methods"], ["denoise"], {}, {}, {}, {}, Path("none.pt"))
    # a second run loads the cached checkpoint instead of training
    out2 = tmp_path / "again"
    assert bench.main(["--quick", "--ckpt", str(tmp_path / "flow"), "--out", str(out2), "--methods", "unguided",
                       "--tasks", "denoise"]) == 0
    res2 = json.loads(out2.with_suffix(".json").read_text())
    assert res2["training"]["cached"] is True and res2["training"]["command"] == res["training"]["command"]
    assert list(res2["cells"]) == ["denoise@0.01", "denoise@0.05"]
    # parts run side by side merge into one result without rerunning anything (--tasks '' --merge-from)
    out3 = tmp_path / "merged"
    assert bench.main(["--quick", "--ckpt", str(tmp_path / "flow"), "--out", str(out3), "--tasks", "",
                       "--merge-from", str(out)]) == 0
    res3 = json.loads(out3.with_suffix(".json").read_text())
    assert res3["tasks"] == res["tasks"] and res3["cells"] == res["cells"] and res3["strength"] == res["strength"]
    # the summary answers items 3 and 4 of the issue from the cells
    s = bench.summary(res)
    keys = [f"{t}@{n}" for n in res["noises"] for t in res["tasks"]]
    for m, v in s["mean_psnr"].items():
        assert v == pytest.approx(sum(res["cells"][k][m]["psnr"] for k in keys) / len(keys))
    best = {k: max(r["psnr"] for m, r in res["cells"][k].items() if m != "unguided") for k in keys}
    assert s["default"]["max_gap_db"] == pytest.approx(max(best[k] - res["cells"][k]["default"]["psnr"] for k in keys))
    f, d = res["cells"][keys[0]]["flowchef"], res["cells"][keys[0]]["dps"]
    assert s["flowchef_vs_dps"][keys[0]]["dpsnr_db"] == pytest.approx(f["psnr"] - d["psnr"])
    assert "## Summary" in out.with_suffix(".md").read_text()
    # --update re-runs some methods on some tasks and replaces only their cells
    before = json.loads(out.with_suffix(".json").read_text())
    assert bench.main(["--quick", "--ckpt", str(tmp_path / "flow"), "--out", str(out), "--update", "--methods",
                       "default", "--tasks", "box"]) == 0
    after = json.loads(out.with_suffix(".json").read_text())
    assert after["updates"][-1]["methods"] == ["default"] and after["updates"][-1]["tasks"] == ["box"]
    for key in after["cells"]:
        for m in after["methods"]:
            if key.startswith("box@") and m == "default":  # seeded: the same images again
                assert after["cells"][key][m]["psnr_per_image"] == before["cells"][key][m]["psnr_per_image"]
            else:
                assert after["cells"][key][m] == before["cells"][key][m]
    with pytest.raises(SystemExit, match="unguided"):
        bench.main(["--quick", "--ckpt", str(tmp_path / "flow"), "--out", str(out), "--update", "--methods",
                    "unguided,default", "--tasks", "box"])
    # --timing re-times unguided / default / PnP-Flow at the stored strengths and the summary quotes it
    assert bench.main(["--quick", "--ckpt", str(tmp_path / "flow"), "--out", str(out), "--timing"]) == 0
    timed = json.loads(out.with_name(out.name + "_timing.json").read_text())
    assert set(timed["cells"]) == {f"{t}@{res['noises'][-1]}" for t in res["tasks"]}
    for c in timed["cells"].values():
        assert c["unguided_vs_unguided"] == 1.0
        assert c["default_vs_unguided"] == pytest.approx(c["seconds_per_image_default"] / c["seconds_per_image_unguided"])
    md = out.with_suffix(".md").read_text()
    assert "re-timed alone" in md
    s2 = bench.summary({**res, "timing": timed})
    assert s2["default"]["max_time_vs_unguided"] == max(c["default_vs_unguided"] for c in timed["cells"].values())


def test_mean_and_standard_error():
    bench = _load_bench()
    mean, se = bench.mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 3) / 2)
    assert bench.mean_se([5.0]) == (5.0, 0.0)
