"""Earth-science density estimation on the sphere S² (volcano, earthquake, flood).

Published protocol (Mathieu & Nickel 2020; De Bortoli et al. 2022; Chen & Lipman 2024, Table 2): a random
80/10/10 train/validation/test split per seed, test negative log-likelihood in nats (w.r.t. the area
measure of the unit sphere), mean ± std over 5 seeds. Rows:

* **uniform**: ``log 4π = 2.531`` for every point;
* **vMF KDE**: ``p(x) = 1/N Σ_i C(κ) exp(κ μ_iᵀ x)``, ``C(κ) = κ / (4π sinh κ)``, centres the training
  points, concentration ``κ`` chosen on the validation split from a log-spaced grid
  (``VonMisesFisherMixture.fit_kde``);
* **steerflow RFM**: ``steerflow.training.train`` with ``path=GeodesicPath(Sphere(2))`` and ``source=`` a base
  with an exact log-density, the network ``TangentVelocity(MLPVelocity(...), S²)`` (an MLP on R³ inputs or
  on spherical harmonics ``--features L``, plus a sinusoidal time embedding, output projected to the tangent
  space). ``--base uniform`` is ``Sphere(2).random_base``; ``--base em`` a ``VonMisesFisherMixture`` fitted by
  EM on the training split, its number of components (``--em-k``) and concentration cap (``--em-kappa-max``)
  chosen on the validation split; ``--base kde`` the KDE row's density. With ``--zero-init 1`` the last
  layer starts at zero, so the untrained flow is the identity and step 0 (the base alone) is a candidate.
  Trained in chunks (``stop_at``/``resume``); the chunk with the best validation NLL is kept (early
  stopping); the NLL is ``-manifold_log_likelihood(..., base_log_prob=base.log_prob)`` (exact Riemannian
  divergence; RK4 with 64 steps, seed 0 re-checked with dopri5 at 1e-5).
* with ``--repeats 1``: many events repeat the exact coordinates of an earlier one (the .md gives the share of test
  points that repeat a training point), so the density is ``steerflow.manifolds.RepeatedSites``:
  ``λ Σ_u w_u vMF(x; s_u, 1e8) + (1 − λ) p_flow(x)`` with a component at each distinct training site and the flow
  (and its EM base, chosen on the validation points that repeat no training site) fitted on the distinct sites;
  ``λ`` and the discount ``d`` (``w_u ∝ n_u − d``) are chosen on validation with every checkpoint. Two more rows
  tell the sites' share from the rest: the KDE on the distinct sites with its own sites component, and every row
  on the test points that repeat a training site and on the others;
* the published Riemannian FM figures (Chen & Lipman 2024) for reference (typed in from the paper,
  marked as such; not measured here).

The budget of a run (``--max-seconds``) is CPU seconds of the one thread (``time.process_time``: base fit,
training and validation; the budget curve's test evaluations are excluded), so a shared machine does not
shrink it. Each checkpoint records the validation NLL and (``--curve 1``, default) the test NLL with RK4-32
against those seconds: the budget curve (``earth_budget{suffix}.png``); the test values are never used for
selection.

Run: ``python benchmarks/bench_earth.py`` (one thread; all catalogues and seeds in one process, then the
final files). Options (``--name value``): ``--steps`` (LR schedule length), ``--hidden``, ``--depth``,
``--batch``, ``--lr``, ``--warmup`` (linear warm-up steps), ``--chunk`` (steps between validation NLLs),
``--patience`` (chunks without validation gain before stopping), ``--max-seconds`` (CPU budget per run),
``--base``, ``--em-k``, ``--em-kappa-max`` (comma lists), ``--repeats`` (0/1), ``--features``, ``--coupling`` (a
coupling name: ``independent``, ``exact-ot``, ..., or ``responsibility``: with ``--base em``, each data point paired
with a draw from its own mixture component, ``VonMisesFisherMixture.coupling``), ``--zero-init``, ``--curve``,
``--datasets`` (comma list), ``--seeds`` (comma list), ``--out-suffix``, ``--ablation`` (comma list of other runs'
suffixes shown side by side);
flags ``--quick`` (one seed, short schedule), ``--merge`` and ``--report`` (rewrite the .md and the budget
figure from the merged .json). A run on a subset writes
``earth_nll{suffix}.part-{dataset}-s{seeds}.json`` (+ ``.pt`` map data); parts may run as parallel
processes, and ``--merge`` (same ``--out-suffix``) combines them, with one configuration and the same
seeds for every catalogue, into ``benchmarks/results/earth_nll{suffix}.{json,md}``,
``earth_density{suffix}.png`` (seed 0: learned density on a Mollweide map with the test points, and model
samples) and ``earth_budget{suffix}.png``. The protocol (splits, test NLL, validation-only model selection)
does not depend on the options. The commands of the published results are in ``benchmarks/README.md``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from steerflow import sample
from steerflow.data.earth import latlon_to_xyz, load_earth, random_split, xyz_to_latlon
from steerflow.manifolds import (RepeatedSites, Sphere, SphericalHarmonics, TangentVelocity, VonMisesFisherMixture,
                                 manifold_log_likelihood)
from steerflow.models import MLPVelocity
from steerflow.paths import GeodesicPath
from steerflow.training import train

ALL_DATASETS = ("volcano", "earthquake", "flood")


def _options(argv) -> dict:
    """``--name value`` pairs from the command line (benchmark script, so no argparse); ``--quick`` and
    ``--merge`` are flags. Unknown names raise ``ValueError`` naming the accepted ones."""
    flags = {"--quick", "--merge", "--report"}
    known = {"--steps", "--hidden", "--depth", "--chunk", "--lr", "--warmup", "--batch", "--max-seconds",
             "--patience", "--datasets", "--seeds", "--out-suffix", "--base", "--em-k", "--features",
             "--coupling", "--zero-init", "--curve", "--em-kappa-max", "--ablation", "--repeats"}
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a in flags:
            out[a[2:]] = True
            i += 1
        elif a in known:
            if i + 1 >= len(argv):
                raise ValueError(f"{a} expects a value, got nothing")
            out[a[2:].replace("-", "_")] = argv[i + 1]
            i += 2
        else:
            raise ValueError(f"unknown option {a!r}; expected one of {sorted(flags | known)}")
    return out


_OPT = _options(sys.argv[1:])
QUICK = bool(_OPT.get("quick", False))
MERGE = bool(_OPT.get("merge", False))
REPORT = bool(_OPT.get("report", False))  # rewrite the .md and the budget figure from the merged .json
# suffixes of other merged runs (e.g. the uniform-base configuration) shown side by side on their seeds
ABLATION = tuple(a for a in _OPT.get("ablation", "").split(",") if a)
DATASETS = tuple(_OPT["datasets"].split(",")) if "datasets" in _OPT else ALL_DATASETS
if not set(DATASETS) <= set(ALL_DATASETS):
    raise ValueError(f"--datasets expects a comma list of {ALL_DATASETS}, got {DATASETS}")
SEEDS = tuple(int(s) for s in _OPT["seeds"].split(",")) if "seeds" in _OPT else ((0,) if QUICK else (0, 1, 2, 3, 4))
HIDDEN = int(_OPT.get("hidden", 256))
DEPTH = int(_OPT.get("depth", 3))
BATCH = int(_OPT.get("batch", 256))
STEPS = int(_OPT.get("steps", 400 if QUICK else 5000))       # LR schedule length per run
CHUNK = int(_OPT.get("chunk", 200 if QUICK else 500))        # evaluate validation NLL every CHUNK steps
MAX_SECONDS_PER_RUN = float(_OPT.get("max_seconds", 60 if QUICK else 200))  # wall-clock safety stop
LR = float(_OPT.get("lr", 2e-3))
WARMUP = int(_OPT.get("warmup", 100))
PATIENCE = int(_OPT.get("patience", 3))   # early stop after this many chunks without validation gain
SUFFIX = _OPT.get("out_suffix", "_quick" if QUICK else "")
# the flow's source: "uniform" (Sphere(2).random_base), "kde" (the vMF KDE row's density) or "em" (a vMF mixture
# fitted by EM on the training split, its number of components chosen on validation from --em-k)
BASE = _OPT.get("base", "uniform")
if BASE not in ("uniform", "kde", "em"):
    raise ValueError(f"--base expects uniform, kde or em, got {BASE!r}")
EM_KS = tuple(int(k) for k in _OPT.get("em_k", "100,300").split(","))
EM_KAPPA_MAX = tuple(float(k) for k in _OPT.get("em_kappa_max", "1e4").split(","))  # grid, chosen on validation
FEATURES = int(_OPT.get("features", 0))       # spherical-harmonic degree of the input features (0: raw xyz)
COUPLING = _OPT.get("coupling", "independent")
ZERO_INIT = _OPT.get("zero_init", "0") == "1"  # zero last layer: the untrained flow is the identity (step 0 = base)
CURVE = _OPT.get("curve", "1") == "1"          # test NLL (RK4-32) at every chunk for the budget curve
# repeated sites: the density is λ·(components at the distinct training sites) + (1 − λ)·(the flow), the flow (and
# its base) fitted on the distinct sites; λ and the discount chosen on validation at every checkpoint
REPEATS = _OPT.get("repeats", "0") == "1"
ODE = dict(method="rk4", steps=64)                   # test NLL and samples
ODE_CHECK = dict(method="dopri5", atol=1e-5, rtol=1e-5)  # seed 0: the test NLL again, adaptive
ODE_VAL = dict(method="rk4", steps=32)               # validation NLL (early stopping) and the density map
LOG_4PI = math.log(4 * math.pi)
# all three catalogues (the package ships volcano and earthquake only): $STEERFLOW_EARTH_DATA, else the repository's
# ../shared/data/earth; the same files either way, so the splits and the numbers do not depend on it
EARTH_DIR = Path(os.environ.get("STEERFLOW_EARTH_DATA") or Path(__file__).resolve().parents[2] / "shared/data/earth")
PUBLISHED = {  # Chen & Lipman (2024), Table 2 / shared data README: typed from the papers, not measured
    "Riemannian FM (Chen & Lipman 2024)": {"volcano": (-7.93, 1.67), "earthquake": (-0.28, 0.08),
                                           "flood": (1.42, 0.09)},
    "vMF KDE (published)": {"earthquake": (0.46, 0.45), "flood": (0.70, 0.05)},
}
OUT = Path(__file__).parent / "results"
S2 = Sphere(2)


# --- baselines ------------------------------------------------------------------------------------

def fit_vmf_kde(train_x, val_x):
    """The vMF KDE on the training split, ``κ`` from 46 log-spaced values in ``[1, 10^4.5]`` by validation NLL."""
    return VonMisesFisherMixture.fit_kde(train_x, val_x)


# --- Riemannian flow matching ---------------------------------------------------------------------

def log_density(model, x, batch=2048, ode=ODE, base_log_prob=None) -> torch.Tensor:
    """``log p_1(x)`` per point (batched, no autograd graph: ``manifold_log_likelihood``'s defaults)."""
    model.eval()
    logp = manifold_log_likelihood(model, x, S2, batch_size=batch, base_log_prob=base_log_prob, **ode)
    model.train()
    return logp.double()


def nll(model, x, batch=2048, ode=ODE, base_log_prob=None) -> float:
    """``-mean log p_1(x)``."""
    return float(-log_density(model, x, batch, ode, base_log_prob).mean())


def site_nll(model, sites, x, ode=ODE, base_log_prob=None) -> tuple[float, torch.Tensor]:
    """With ``sites`` (a ``RepeatedSites``): the mean ``-log p(x)`` of the sites + flow density and its
    per-point log-density; without: the flow's."""
    q = log_density(model, x, ode=ode, base_log_prob=base_log_prob)
    logp = q if sites is None else sites.log_prob(x, q)
    return float(-logp.mean()), logp


def fit_base(train_x, val_x, seed: int):
    """The flow's source ``(sample, log_prob, info)`` for ``BASE``; mixture choices use the validation split only."""
    if BASE == "uniform":
        return S2.random_base, None, {"base": "uniform"}
    if BASE == "kde":
        mix, kappa = VonMisesFisherMixture.fit_kde(train_x, val_x)
        return mix.sample, mix.log_prob, {"base": "kde", "base_kappa": kappa,
                                         "base_val_nll": float(-mix.log_prob(val_x.double()).mean())}
    mix, sel = VonMisesFisherMixture.fit_em_select(train_x, val_x, EM_KS, EM_KAPPA_MAX, seed=seed, iters=100)
    return mix.sample, mix.log_prob, {"base": "em", "base_k": sel.components, "base_kappa_max": sel.kappa_max,
                                      "base_val_nll": sel.held_out_nll, "base_components": sel.fitted}


def fit_rfm(train_x, val_x, seed: int, log=print, test_x=None, sites=None):
    """Fit the base, then train the flow in chunks within ``MAX_SECONDS_PER_RUN`` (base fit, training and
    validation all count); the chunk with the best validation NLL is kept (with a zero-initialised last
    layer, step 0 is the base itself and a candidate). With ``CURVE`` the test NLL (RK4-32) of each chunk is
    recorded for the budget curve; it is never used for selection.

    With ``sites`` (a ``RepeatedSites`` of the training split) the base and the flow are fitted on the distinct
    sites (the base chosen on the validation points that repeat no training site), and each checkpoint's
    validation NLL is that of the sites + flow density with ``(λ, d)`` chosen on validation for it; the chosen
    instance is returned in ``info["sites"]``."""
    t0, c0 = time.perf_counter(), time.process_time()
    if sites is not None:
        new = val_x[~sites.repeats(val_x)]
        train_x = sites.sites.float()
        source, base_lp, base_info = fit_base(train_x, new if new.shape[0] else val_x, seed)
    else:
        source, base_lp, base_info = fit_base(train_x, val_x, seed)
    base_seconds = time.process_time() - c0
    log(f"    base {base_info} ({base_seconds:.1f}s)")
    torch.manual_seed(seed)
    embed = SphericalHarmonics(FEATURES) if FEATURES > 0 else None
    net = MLPVelocity(3, hidden=HIDDEN, depth=DEPTH, time_embed_dim=32,
                      in_dim=embed.out_dim if embed is not None else None)
    if ZERO_INIT:
        net.zero_output_()
    model = TangentVelocity(net, S2, embed=embed)
    best = (float("inf"), None, 0, None)
    history = []

    def checkpoint(done, loss):
        nonlocal best, c0
        chosen = None
        if sites is None:
            v = nll(model, val_x, ode=ODE_VAL, base_log_prob=base_lp)
        else:
            chosen, v = sites.select(val_x, log_density(model, val_x, ode=ODE_VAL, base_log_prob=base_lp))
        h = {"step": done, "val_nll": v, "train_loss": loss, "seconds": time.process_time() - c0,
             "wall_seconds": time.perf_counter() - t0}
        if chosen is not None:
            h.update(sites_weight=chosen.weight, sites_discount=chosen.discount)
        if CURVE and test_x is not None:  # not part of the budget: the budget curve's test points
            c1 = time.process_time()
            h["test_nll_rk4_32"] = site_nll(model, chosen, test_x, ode=ODE_VAL, base_log_prob=base_lp)[0]
            c0 += time.process_time() - c1
        history.append(h)
        log(f"    step {done:5d}  loss {loss:.4f}  val NLL {v:+.3f}  ({h['seconds']:.0f}s)")
        if v < best[0]:
            best = (v, copy.deepcopy(model.state_dict()), done, chosen)

    coupling = COUPLING
    if COUPLING == "responsibility":  # x_0 from the fitted mixture's component of each data point
        if BASE != "em":
            raise ValueError("--coupling responsibility needs --base em (a fitted vMF mixture)")
        coupling = source.__self__.coupling()
    if ZERO_INIT:
        checkpoint(0, float("nan"))
    with tempfile.TemporaryDirectory() as tmp:
        done = 0
        while done < STEPS:
            stop = min(done + CHUNK, STEPS)
            res = train(model, train_x, source=source, path=GeodesicPath(S2), steps=STEPS, coupling=coupling,
                        batch_size=BATCH, lr=LR, warmup=WARMUP, lr_schedule="cosine", device="cpu", seed=seed,
                        out_dir=tmp, resume=done > 0, stop_at=stop, progress=False, log_every=CHUNK)
            done = res.step
            checkpoint(done, float(res.losses[-CHUNK:].mean()))
            if time.process_time() - c0 > MAX_SECONDS_PER_RUN:
                log(f"    time budget reached at step {done}")
                break
            # early stopping: PATIENCE chunks without improvement on validation
            if len(history) - 1 - [h["step"] for h in history].index(best[2]) >= PATIENCE:
                log(f"    early stop at step {done} (best step {best[2]})")
                break
    model.load_state_dict(best[1])
    model.eval()
    info = {"best_step": best[2], "best_val_nll": best[0], "history": history, "base_seconds": base_seconds,
            "train_seconds": time.process_time() - c0, "wall_seconds": time.perf_counter() - t0, **base_info}
    if sites is not None:
        info["sites"] = best[3]
    return model, (source, base_lp), info


# --- figure ---------------------------------------------------------------------------------------

def plot(figure_data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(figure_data)
    fig = plt.figure(figsize=(13, 3.6 * n))
    for row, (name, d) in enumerate(figure_data.items()):
        lon_g, lat_g, logp = d["lon_grid"], d["lat_grid"], d["log_density"]
        ax = fig.add_subplot(n, 2, 2 * row + 1, projection="mollweide")
        vmin = float(np.quantile(logp, 0.02))
        mesh = ax.pcolormesh(lon_g, lat_g, logp, cmap="viridis", shading="auto", vmin=vmin, rasterized=True)
        lat_t, lon_t = d["test"]
        ax.scatter(np.deg2rad(lon_t), np.deg2rad(lat_t), s=2, c="#ff5a36", alpha=0.8, linewidths=0, label="test data")
        ax.set_title(f"{name}: learned log-density (RFM, seed 0) + test points", fontsize=10, pad=14)
        ax.set_xticklabels([])
        ax.grid(True, alpha=0.3)
        cb = fig.colorbar(mesh, ax=ax, shrink=0.7, pad=0.02)
        cb.set_label("log p (nats / sr)")
        ax2 = fig.add_subplot(n, 2, 2 * row + 2, projection="mollweide")
        lat_s, lon_s = d["samples"]
        lat_a, lon_a = d["train"]
        ax2.scatter(np.deg2rad(lon_a), np.deg2rad(lat_a), s=2, c="#555555", alpha=0.6, linewidths=0, zorder=1)
        ax2.scatter(np.deg2rad(lon_s), np.deg2rad(lat_s), s=1.5, c="#0072B2", alpha=0.5, linewidths=0, zorder=2)
        ax2.set_title(f"{name}: {len(lat_s)} model samples (blue), training data (dark grey)", fontsize=10, pad=14)
        ax2.set_xticklabels([])
        ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def density_grid(model, base_log_prob=None, sites=None, n_lat=60, n_lon=120):
    lat = torch.linspace(-90 + 90 / n_lat, 90 - 90 / n_lat, n_lat, dtype=torch.float64)
    lon = torch.linspace(-180 + 180 / n_lon, 180 - 180 / n_lon, n_lon, dtype=torch.float64)
    LAT, LON = torch.meshgrid(lat, lon, indexing="ij")
    x = latlon_to_xyz(LAT.reshape(-1), LON.reshape(-1))
    model.eval()
    with torch.no_grad():
        logp = torch.cat([site_nll(model, sites, xb, ode=ODE_VAL, base_log_prob=base_log_prob)[1]
                          for xb in torch.split(x, 4096)])
    return (torch.deg2rad(LON).numpy(), torch.deg2rad(LAT).numpy(), logp.reshape(n_lat, n_lon).numpy())


def _mean_std(vals):
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def _config() -> dict:
    return {"hidden": HIDDEN, "depth": DEPTH, "batch": BATCH, "steps": STEPS, "chunk": CHUNK, "lr": LR,
            "warmup": WARMUP, "patience": PATIENCE, "max_seconds_per_run": MAX_SECONDS_PER_RUN, "ode": ODE,
            "quick": QUICK, "base": BASE, "em_k": list(EM_KS), "em_kappa_max": list(EM_KAPPA_MAX),
            "features": FEATURES, "coupling": COUPLING, "zero_init": ZERO_INIT, "repeats": REPEATS}


def _command() -> str:
    return "python benchmarks/bench_earth.py" + "".join(f" {a}" for a in sys.argv[1:])


def _part_paths(name: str, seeds=None):
    tag = "-".join(str(k) for k in (SEEDS if seeds is None else seeds))
    return OUT / f"earth_nll{SUFFIX}.part-{name}-s{tag}.json", OUT / f"earth_density{SUFFIX}.part-{name}-s{tag}.pt"


def run_dataset(name: str) -> None:
    """The ``SEEDS`` of one catalogue; writes ``earth_nll{suffix}.part-{name}-s{seeds}.json`` (+ the map data
    of the first seed when it is seed 0)."""
    x = load_earth(name, root=EARTH_DIR)
    rows = {"uniform": [], "vmf_kde": [], "rfm": []}
    per_seed = []
    fig = None
    t_ds = time.perf_counter()
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        tr, va, te = random_split(x, (0.8, 0.1, 0.1), generator=g)
        rows["uniform"].append(LOG_4PI)
        kde_mix, kappa = fit_vmf_kde(tr, va)
        kde_lp = kde_mix.log_prob(te.double())
        kde = float(-kde_lp.mean())
        rows["vmf_kde"].append(kde)
        print(f"[{name} seed {seed}] n={len(tr)}/{len(va)}/{len(te)}  vMF KDE κ={kappa:.0f}: test NLL {kde:+.3f}",
              flush=True)
        sites = RepeatedSites.from_points(tr) if REPEATS else None
        model, (source, base_lp), info = fit_rfm(tr, va, seed, log=lambda s: print(s, flush=True), test_x=te,
                                                 sites=sites)
        chosen = info.pop("sites", None)
        t0 = time.perf_counter()
        test_nll, test_lp = site_nll(model, chosen, te, base_log_prob=base_lp)
        rows["rfm"].append(test_nll)
        base_te = base_lp(te.double()) if base_lp is not None else torch.full((len(te),), -LOG_4PI, dtype=torch.float64)
        extra = {}
        if sites is not None:
            # the rows that tell the sites' share from the flow's: the base alone and the KDE, each with the sites
            # (λ, d chosen on validation), and every row on the test points that repeat no training site
            base_sites = sites.select(va, base_lp(va.double()))[0]
            base_te = base_sites.log_prob(te, base_te)
            new_va = va[~sites.repeats(va)]
            kde_new, kappa_new = VonMisesFisherMixture.fit_kde(sites.sites, new_va if len(new_va) else va)
            kde_sites = sites.select(va, kde_new.log_prob(va.double()))[0]
            kde_sites_te = kde_sites.log_prob(te, kde_new.log_prob(te.double()))
            at_site = sites.repeats(te)
            rows_lp = {"rfm": test_lp, "base": base_te, "kde": kde_lp, "kde_sites": kde_sites_te}
            extra = {"kde_sites_test_nll": float(-kde_sites_te.mean()), "kde_sites_kappa": kappa_new,
                     "kde_sites_weight": kde_sites.weight, "sites_weight": chosen.weight,
                     "sites_discount": chosen.discount, "sites": len(sites), "test_repeats": int(at_site.sum()),
                     "new_site_nll": {k: float(-v[~at_site].mean()) for k, v in rows_lp.items()},
                     "repeat_nll": {k: float(-v[at_site].mean()) for k, v in rows_lp.items()}}
            print(f"[{name} seed {seed}] {int(at_site.sum())}/{len(te)} test points repeat a training site; sites "
                  f"weight {chosen.weight:.2f}, discount {chosen.discount:.2f}; KDE + sites "
                  f"{extra['kde_sites_test_nll']:+.3f}; new sites only: {extra['new_site_nll']}", flush=True)
        base_test = float(-base_te.mean())
        print(f"[{name} seed {seed}] RFM test NLL {test_nll:+.3f} (best step {info['best_step']}, "
              f"eval {time.perf_counter() - t0:.1f}s); base alone {base_test:+.3f}", flush=True)
        per_seed.append({"seed": seed, "kappa": kappa, "kde_test_nll": kde, "rfm_test_nll": test_nll,
                         "base_test_nll": base_test, **extra, **info})
        if seed == 0:
            per_seed[-1]["rfm_test_nll_dopri5"] = site_nll(model, chosen, te, ode=ODE_CHECK, base_log_prob=base_lp)[0]
            print(f"[{name} seed {seed}] RFM test NLL with dopri5(1e-5): {per_seed[-1]['rfm_test_nll_dopri5']:+.3f}",
                  flush=True)
            with torch.no_grad():
                g_s = torch.Generator().manual_seed(1234)

                def flow_sample(m, g):
                    return sample(model, source(m, g), **ODE, geometry=S2)

                xs = flow_sample(2000, g_s) if chosen is None else chosen.sample(2000, flow_sample, g_s)
            lon_g, lat_g, logp = density_grid(model, base_lp, chosen)
            fig = {"lon_grid": lon_g, "lat_grid": lat_g, "log_density": logp,
                   "test": [a.numpy() for a in xyz_to_latlon(te)],
                   "train": [a.numpy() for a in xyz_to_latlon(tr)],
                   "samples": [a.numpy() for a in xyz_to_latlon(xs)]}
    part = {"n": int(x.shape[0]), "seeds": list(SEEDS), "config": _config(), "command": _command(),
            "uniform": _mean_std(rows["uniform"]), "vmf_kde": _mean_std(rows["vmf_kde"]),
            "rfm": _mean_std(rows["rfm"]), "per_seed": per_seed, "seconds": time.perf_counter() - t_ds}
    j, f = _part_paths(name)
    torch.save(fig, f)
    j.write_text(json.dumps(part, indent=2))
    print(f"[{name}] RFM {part['rfm'][0]:+.3f} ± {part['rfm'][1]:.3f}  ({part['seconds'] / 60:.1f} min) -> {j}",
          flush=True)


def merge() -> None:
    """Combine the per-catalogue parts (one configuration; seeds may be split across parts, e.g. across
    parallel processes) into the final files. Mean ± std are recomputed from the per-seed values."""
    datasets, figure_data, configs, commands = {}, {}, {}, set()
    for name in ALL_DATASETS:
        files = sorted(OUT.glob(f"earth_nll{SUFFIX}.part-{name}-s*.json"))
        if not files:
            raise ValueError(f"merge expects earth_nll{SUFFIX}.part-{name}-s*.json in {OUT} "
                             f"(run with --datasets {name} first), found none")
        per_seed, seconds = [], 0.0
        for j in files:
            p = json.loads(j.read_text())
            configs[j.name] = p["config"]
            commands.add(p["command"])
            per_seed += p["per_seed"]
            seconds += p["seconds"]
            n = p["n"]
            fig = torch.load(j.with_name(j.name.replace("earth_nll", "earth_density")).with_suffix(".pt"),
                             weights_only=False)
            if fig is not None:
                figure_data[name] = fig
        per_seed.sort(key=lambda r: r["seed"])
        seeds = [r["seed"] for r in per_seed]
        if len(set(seeds)) != len(seeds) or per_seed[0]["seed"] != 0:
            raise ValueError(f"merge expects distinct seeds including 0 for {name}, got {seeds}")
        datasets[name] = {"n": n, "uniform": _mean_std([LOG_4PI] * len(seeds)),
                          "vmf_kde": _mean_std([r["kde_test_nll"] for r in per_seed]),
                          "rfm": _mean_std([r["rfm_test_nll"] for r in per_seed]),
                          "base": _mean_std([r.get("base_test_nll", LOG_4PI) for r in per_seed]),
                          "per_seed": per_seed, "seconds": seconds}
    if len({json.dumps(c, sort_keys=True) for c in configs.values()}) != 1:
        raise ValueError(f"merge expects one configuration across parts, got {configs}")
    all_seeds = {json.dumps([r["seed"] for r in d["per_seed"]]) for d in datasets.values()}
    if len(all_seeds) != 1:
        raise ValueError(f"merge expects the same seeds for every catalogue, got {all_seeds}")
    results = {"protocol": "random 80/10/10 split per seed, test NLL in nats (mean ± std over seeds)",
               "seeds": [r["seed"] for r in datasets[ALL_DATASETS[0]]["per_seed"]],
               "config": next(iter(configs.values())),
               "commands": sorted(commands) + ["python benchmarks/bench_earth.py --merge"
                                               + (f" --out-suffix {SUFFIX}" if SUFFIX else "")],
               "datasets": datasets, "published": PUBLISHED,
               "total_seconds": sum(d["seconds"] for d in datasets.values())}
    (OUT / f"earth_nll{SUFFIX}.json").write_text(json.dumps(results, indent=2))
    plot(figure_data, OUT / f"earth_density{SUFFIX}.png")
    report(results)
    for f in list(OUT.glob(f"earth_nll{SUFFIX}.part-*.json")) + list(OUT.glob(f"earth_density{SUFFIX}.part-*.pt")):
        f.unlink()
    print(f"wrote {OUT}/earth_nll{SUFFIX}.{{json,md}} and earth_density{SUFFIX}.png")
    print("reproduce: " + " ; ".join(results["commands"]))


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    if REPORT:
        report(json.loads((OUT / f"earth_nll{SUFFIX}.json").read_text()))
        return
    if not MERGE:
        for name in DATASETS:
            run_dataset(name)
    if MERGE or set(DATASETS) == set(ALL_DATASETS):
        merge()


def report(results) -> None:
    """Write ``earth_nll{suffix}.md`` and the budget-curve figure ``earth_budget{suffix}.png`` from the merged
    results, with the runs named by ``--ablation`` side by side."""
    ablations = {a: json.loads((OUT / f"earth_nll{a}.json").read_text()) for a in ABLATION}
    plot_budget(results, ablations, OUT / f"earth_budget{SUFFIX}.png")
    write_md(results, ablations, OUT / f"earth_nll{SUFFIX}.md")


def _describe_config(c) -> str:
    base = {"uniform": "uniform base", "kde": "vMF-KDE base",
            "em": f"vMF-mixture base (EM, K ∈ {c.get('em_k')} × κ_max ∈ {c.get('em_kappa_max')} chosen on validation)"}
    feats = f"spherical harmonics to degree {c['features']}" if c.get("features") else "R³ inputs"
    sites = ("components at the repeated training sites (κ = 1e8, weight λ and discount d chosen on validation at "
             "every checkpoint) + a flow fitted on the distinct sites: " if c.get("repeats") else "")
    return (f"{sites}{base[c.get('base', 'uniform')]}, MLP {c['hidden']}×{c['depth']} on {feats} + time"
            f"{', zero-initialised output' if c.get('zero_init') else ''}, {c.get('coupling', 'independent')} "
            f"coupling, batch {c['batch']}, AdamW lr {c['lr']}, {c['warmup']} warm-up steps, cosine over "
            f"{c['steps']} steps, validation every {c['chunk']} steps")


def plot_budget(results, ablations, path: Path) -> None:
    """NLL (RK4-32) against CPU seconds of the run (base fit + training + validation), one panel per catalogue:
    validation (dashed) and test (solid), every seed of the main run and of each ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ALL_DATASETS), figsize=(5 * len(ALL_DATASETS), 3.8))
    runs = {f"this run ({results['config'].get('base', 'uniform')} base)": results,
            **{f"{a.lstrip('_')} ({r['config'].get('base', 'uniform')} base)": r for a, r in ablations.items()}}
    colours = ["#0072B2", "#D55E00", "#009E73", "#CC79A7"]
    for ax, d in zip(axes, ALL_DATASETS):
        for (label, res), col in zip(runs.items(), colours):
            for i, p in enumerate(res["datasets"][d]["per_seed"]):
                h = [r for r in p["history"] if "test_nll_rk4_32" in r]
                if not h:
                    continue
                t = [r["seconds"] for r in h]
                ax.plot(t, [r["test_nll_rk4_32"] for r in h], "-o", ms=2.5, color=col, alpha=0.8,
                        label=f"{label}: test" if i == 0 else None)
                ax.plot(t, [r["val_nll"] for r in h], "--", color=col, alpha=0.5,
                        label=f"{label}: validation" if i == 0 else None)
        ax.axhline(results["datasets"][d]["vmf_kde"][0], color="grey", lw=1, ls=":", label="vMF KDE (test mean)")
        ax.set_title(d)
        ax.set_xlabel("CPU seconds of the run (one thread)")
        ax.set_ylabel("NLL (nats)")
        ax.set_ylim(top=min(ax.get_ylim()[1], LOG_4PI + 0.5))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _repeats_md(ds, fmt) -> list[str]:
    """The test NLL split into the points that repeat a training site and the rest (new sites)."""
    rows = [("vMF KDE", "kde"), ("vMF KDE + repeated sites", "kde_sites"), ("the flow's base alone", "base"),
            ("steerflow RFM", "rfm")]
    share = {d: _mean_std([p["test_repeats"] / _test_size(ds[d]["n"]) for p in ds[d]["per_seed"]])
             for d in ALL_DATASETS}
    lines = ["", "Many events repeat the coordinates of an earlier one (a volcano erupts again). Share of test points "
             "that repeat a training site exactly: " + ", ".join(f"{d} {100 * share[d][0]:.1f} %" for d in ALL_DATASETS)
             + ". On such a point the density of a model that places mass at the site grows like log κ, so the "
             "figures above depend on the sites' κ (here 1e8: the density of a unit mass spread over one 0.01° "
             "cell). "
             "The same models on the two kinds of test point (mean ± std over seeds):", "",
             "| method | " + " | ".join(f"{d}: repeats | {d}: new sites" for d in ALL_DATASETS) + " |",
             "|---|" + "---|---|" * len(ALL_DATASETS)]
    for label, key in rows:
        cells = []
        for d in ALL_DATASETS:
            for part in ("repeat_nll", "new_site_nll"):
                cells.append(fmt(_mean_std([p[part][key] for p in ds[d]["per_seed"]])))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Chosen on validation (per seed, weight λ / discount d): " + "; ".join(
        f"{d}: " + ", ".join(f"{p['sites_weight']:.2f}/{p['sites_discount']:.1f}" for p in ds[d]["per_seed"])
        for d in ALL_DATASETS))
    return lines


def _test_size(n: int) -> int:
    """The size of the test split of ``n`` points (``random_split``'s 80/10/10)."""
    return len(random_split(torch.empty(n, 0), (0.8, 0.1, 0.1))[2])


def write_md(results, ablations, path: Path) -> None:
    def fmt(ms):
        return f"{ms[0]:+.2f} ± {ms[1]:.2f}"

    c = results["config"]
    ds = results["datasets"]
    seconds = [p["train_seconds"] for d in ALL_DATASETS for p in ds[d]["per_seed"]]
    lines = ["# Earth density estimation on S² — test NLL (nats, lower is better)", "",
             f"Protocol: {results['protocol']}; seeds {results['seeds']}. steerflow: {_describe_config(c)}; "
             f"the chunk with the best validation NLL is kept (with the zero-initialised output, step 0 — the base "
             f"density itself — is a candidate), early stop after {c['patience']} chunks without validation gain. "
             f"Budget per run ≤ {c['max_seconds_per_run']:.0f} CPU seconds of one thread (base fit + training + "
             f"validation; measured: {min(seconds):.0f}–{max(seconds):.0f} s). NLL by the exact Riemannian divergence "
             f"with the base's exact log-density, RK4 with 64 steps on the test split (seed 0 re-checked with "
             f"dopri5 1e-5, below); RK4 with 32 steps for validation, the budget curve and the map.", "",
             "| method | " + " | ".join(ALL_DATASETS) + " |", "|---|" + "---|" * len(ALL_DATASETS)]
    lines.append("| uniform (log 4π) | " + " | ".join(fmt(ds[d]["uniform"]) for d in ALL_DATASETS) + " |")
    lines.append("| vMF KDE (κ on validation, measured) | " + " | ".join(fmt(ds[d]["vmf_kde"]) for d in ALL_DATASETS) + " |")
    if c.get("repeats"):
        lines.append("| vMF KDE + repeated sites (KDE on the distinct sites, measured) | " + " | ".join(
            fmt(_mean_std([p["kde_sites_test_nll"] for p in ds[d]["per_seed"]])) for d in ALL_DATASETS) + " |")
    if c.get("base", "uniform") != "uniform":
        lines.append("| the flow's base alone (measured) | " + " | ".join(fmt(ds[d]["base"]) for d in ALL_DATASETS) + " |")
    lines.append("| **steerflow RFM (measured)** | " + " | ".join(f"**{fmt(ds[d]['rfm'])}**" for d in ALL_DATASETS) + " |")
    for label, vals in results["published"].items():
        lines.append(f"| {label} — published, not measured | "
                     + " | ".join(fmt(vals[d]) if d in vals else "—" for d in ALL_DATASETS) + " |")
    if c.get("repeats"):
        lines += _repeats_md(ds, fmt)
    lines += ["", "Per seed (RFM test NLL, base alone, best step, CPU seconds of the run):", ""]
    for d in ALL_DATASETS:
        lines.append(f"- {d}: " + ", ".join(
            f"seed {p['seed']}: {p['rfm_test_nll']:+.3f} (base {p.get('base_test_nll', LOG_4PI):+.3f}, step "
            f"{p['best_step']}, {p['train_seconds']:.0f}s)" for p in ds[d]["per_seed"]))
    lines.append("")
    lines.append("Discretisation check (seed 0, test NLL RK4-64 vs dopri5 1e-5): " + "; ".join(
        f"{d}: {ds[d]['per_seed'][0]['rfm_test_nll']:+.3f} vs {ds[d]['per_seed'][0]['rfm_test_nll_dopri5']:+.3f}"
        for d in ALL_DATASETS))
    lines += ["", "## Budget curve", "",
              f"NLL (RK4-32) against the CPU seconds of the run (figure `earth_budget{SUFFIX}.png`; the test NLL "
              "of each checkpoint is recorded for this curve only, never used for selection). Seed 0:", ""]
    runs = {"this run": results, **{f"`{a}`": r for a, r in ablations.items()}}
    for label, res in runs.items():
        for d in ALL_DATASETS:
            h = res["datasets"][d]["per_seed"][0]["history"]
            lines.append(f"- {label}, {d}: " + ", ".join(
                f"{r['seconds']:.0f}s → val {r['val_nll']:+.2f}"
                + (f" / test {r['test_nll_rk4_32']:+.2f}" if "test_nll_rk4_32" in r else "") for r in h))
    if ablations:
        lines += ["", "## Side by side (same seeds, same protocol)", "",
                  "| configuration | seeds | " + " | ".join(ALL_DATASETS) + " |", "|---|---|" + "---|" * len(ALL_DATASETS)]
        common = sorted(set.intersection(*({p["seed"] for p in r["datasets"][d]["per_seed"]}
                                           for r in runs.values() for d in ALL_DATASETS)))
        for label, res in runs.items():
            vals = []
            for d in ALL_DATASETS:
                ps = [p for p in res["datasets"][d]["per_seed"] if p["seed"] in common]
                ms = _mean_std([p["rfm_test_nll"] for p in ps])
                vals.append(fmt(ms) if len(ps) > 1 else f"{ms[0]:+.2f}")
            lines.append(f"| {label}: {_describe_config(res['config'])} | {common} | " + " | ".join(vals) + " |")
    lines += ["", f"Total compute {results['total_seconds'] / 60:.1f} min wall clock (one thread; the machine was "
              f"shared, so wall clock exceeds CPU time). Figures: `earth_density{SUFFIX}.png`, `earth_budget{SUFFIX}.png`.", "",
              "Reproduce (the part commands may run in parallel; the last one merges):", ""]
    lines += [f"    {cmd}" for cmd in results["commands"]]
    if ablations:
        lines += ["", "The side-by-side runs, then this report:", ""]
        lines += [f"    {cmd}" for r in ablations.values() for cmd in r["commands"]]
        lines.append("    python benchmarks/bench_earth.py --report --ablation " + ",".join(ablations)
                     + (f" --out-suffix {SUFFIX}" if SUFFIX else ""))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
