"""One self-contained GPU check of steerflow's models and training loop (run it on a CUDA machine).

Measures and checks, on a class-conditional U-Net (32×32×3, CIFAR-sized; tiny with --quick):
  * training throughput (img/s) and peak memory (torch.cuda.max_memory_allocated) for
    fp32, bf16 autocast, and torch.compile + bf16;
  * that bf16 autocast changes the loss only slightly (same weights, same batch; and after a short
    training run from the same initialisation);
  * sampling throughput (img/s, Euler, 20 steps) in fp32 and bf16;
  * steerflow.training.train end to end on the device (amp, EMA, clipping, checkpoint, stop + resume),
    reporting whether the resumed loss trace equals the uninterrupted one;
  * exact-OT and Sinkhorn couplings on device tensors (batch 256 / 1024 / 4096): time per call, and exact
    OT's permutation equal to the CPU one.
Every section is guarded: a failure is recorded in the JSON and the script continues; the exit code
is 1 if any section failed or a check did not pass.

Run:  python benchmarks/gpu_check.py                      (CUDA, full sizes)
      python benchmarks/gpu_check.py --device cpu --quick (smoke test: tiny sizes, compile skipped)
Options: --device DEV, --quick, --compile (also time torch.compile on CPU), --out PATH
(default $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check.json).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _opt(name: str, default: str | None = None) -> str | None:
    if name in sys.argv:
        i = sys.argv.index(name)
        if i + 1 >= len(sys.argv):
            raise SystemExit(f"{name} needs a value")
        return sys.argv[i + 1]
    return default


QUICK = "--quick" in sys.argv
FORCE_COMPILE = "--compile" in sys.argv
DEVICE = torch.device(_opt("--device", "cuda" if torch.cuda.is_available() else "cpu"))
_default_out = (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                else Path(__file__).resolve().parent / "results" / "gpu_check.json")
OUT_PATH = Path(_opt("--out", str(_default_out)))
CUDA = DEVICE.type == "cuda"
if not CUDA:
    torch.set_num_threads(1)  # a shared CPU box: more threads only oversubscribe it

if QUICK:
    UNET = dict(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention=True,
                n_classes=10, label_dropout=0.1, image_size=8)
    BATCH, WARMUP, STEPS, SAMPLE_BATCH, SAMPLE_STEPS, TRAIN_STEPS = 4, 2, 3, 4, 4, 8
else:
    UNET = dict(in_channels=3, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention=True,
                n_classes=10, label_dropout=0.1, image_size=32)
    BATCH, WARMUP, STEPS, SAMPLE_BATCH, SAMPLE_STEPS, TRAIN_STEPS = 128, 10, 50, 256, 20, 60


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def fresh_model():
    from steerflow.models import UNetVelocity

    torch.manual_seed(0)
    return UNetVelocity(**UNET).to(DEVICE)


def batches(n: int, seed: int = 0):
    """Fixed synthetic batches (structured, not white noise, so the loss is learnable)."""
    g = torch.Generator().manual_seed(seed)
    s = UNET["image_size"]
    grid = torch.linspace(-1, 1, s)
    out = []
    for _ in range(n):
        y = torch.randint(UNET["n_classes"], (BATCH,), generator=g)
        freq = (y.float() + 1)[:, None, None, None]
        img = torch.sin(freq * grid[None, None, :, None] * 3) * torch.cos(freq * grid[None, None, None, :] * 2)
        img = img.expand(BATCH, UNET["in_channels"], s, s) + 0.1 * torch.randn(BATCH, UNET["in_channels"], s, s, generator=g)
        out.append((img.to(DEVICE), y.to(DEVICE)))
    return out


def train_steps(model, opt, data, *, bf16: bool, seed: int = 0) -> list[float]:
    from steerflow.paths import LinearPath
    from steerflow.training import flow_matching_loss

    path = LinearPath()
    g = torch.Generator(DEVICE).manual_seed(seed)
    losses = []
    for x_1, y in data:
        x_0 = torch.randn(x_1.shape, generator=g, device=DEVICE)
        t = torch.rand(x_1.shape[0], generator=g, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(model, x_0, x_1, t, path=path, cond=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).cpu()]


def throughput(mode: str) -> dict:
    model = fresh_model()
    bf16 = mode in ("bf16", "compile_bf16")
    net = model
    if mode.startswith("compile"):
        if not CUDA and not FORCE_COMPILE:
            return {"skipped": "torch.compile is timed on CUDA only (pass --compile to force on CPU)"}
        net = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    data = batches(WARMUP + STEPS)
    t0 = time.perf_counter()
    train_steps(net, opt, data[:WARMUP], bf16=bf16)
    sync()
    warm_s = time.perf_counter() - t0
    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    t0 = time.perf_counter()
    losses = train_steps(net, opt, data[WARMUP:], bf16=bf16)
    sync()
    dt = time.perf_counter() - t0
    return {"img_per_s": STEPS * BATCH / dt, "step_ms": 1e3 * dt / STEPS, "warmup_s": warm_s,
            "peak_memory_mib": torch.cuda.max_memory_allocated(DEVICE) / 2**20 if CUDA else None,
            "final_loss": losses[-1]}


def bf16_closeness() -> dict:
    """Loss on one batch with the same weights in fp32 and bf16; then short runs from one init."""
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    train_steps(model, opt, batches(max(3, WARMUP), seed=1), bf16=False)  # open the zero-initialised layers
    (x_1, y), = batches(1, seed=2)
    g = torch.Generator(DEVICE).manual_seed(3)
    x_0 = torch.randn(x_1.shape, generator=g, device=DEVICE)
    t = torch.rand(x_1.shape[0], generator=g, device=DEVICE)
    from steerflow.paths import LinearPath
    from steerflow.training import flow_matching_loss

    model.eval()  # no label dropout: the two evaluations see the same labels
    with torch.no_grad():
        l32 = float(flow_matching_loss(model, x_0, x_1, t, path=LinearPath(), cond=y))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            l16 = float(flow_matching_loss(model, x_0, x_1, t, path=LinearPath(), cond=y))
    rel_one = abs(l16 - l32) / abs(l32)
    runs = {}
    for bf16 in (False, True):
        m = fresh_model()
        o = torch.optim.AdamW(m.parameters(), lr=2e-4)
        runs[bf16] = train_steps(m, o, batches(TRAIN_STEPS, seed=4), bf16=bf16, seed=5)
    k = max(1, TRAIN_STEPS // 5)
    tail32, tail16 = sum(runs[False][-k:]) / k, sum(runs[True][-k:]) / k
    rel_run = abs(tail16 - tail32) / abs(tail32)
    return {"loss_fp32": l32, "loss_bf16": l16, "rel_diff_same_weights": rel_one, "tail_loss_fp32": tail32,
            "tail_loss_bf16": tail16, "rel_diff_after_training": rel_run,
            "passed": rel_one < 0.02 and rel_run < 0.10, "tolerances": {"same_weights": 0.02, "after_training": 0.10}}


def sampling() -> dict:
    from steerflow.solvers import sample

    model = fresh_model().eval()
    out = {}
    for bf16 in (False, True):
        g = torch.Generator(DEVICE).manual_seed(0)
        x_0 = torch.randn(SAMPLE_BATCH, *model.event_shape, generator=g, device=DEVICE)
        y = torch.arange(SAMPLE_BATCH, device=DEVICE) % UNET["n_classes"]
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            sample(model, x_0, steps=2, method="euler", cond=y)  # warm-up
            sync()
            t0 = time.perf_counter()
            x = sample(model, x_0, steps=SAMPLE_STEPS, method="euler", cond=y)
            sync()
        dt = time.perf_counter() - t0
        out["bf16" if bf16 else "fp32"] = {"img_per_s": SAMPLE_BATCH / dt, "nfe": SAMPLE_STEPS,
                                           "finite": bool(torch.isfinite(x).all())}
    return out


def train_end_to_end() -> dict:
    from steerflow.training import load_checkpoint, train

    data = torch.cat([x for x, _ in batches(4, seed=6)]).cpu(), torch.cat([y for _, y in batches(4, seed=6)]).cpu()
    kw = dict(steps=TRAIN_STEPS // 2, batch_size=BATCH, lr=2e-4, warmup=2, ema_decay=0.99, grad_clip=1.0,
              amp="bf16" if CUDA else None, device=DEVICE, seed=0, progress=False, log_every=5, ckpt_every=5)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        full = train(fresh_model(), data, out_dir=Path(tmp) / "full", **kw)
        sync()
        dt = time.perf_counter() - t0
        part = train(fresh_model(), data, out_dir=Path(tmp) / "part", stop_at=kw["steps"] // 2, **kw)
        resumed = train(fresh_model(), data, out_dir=Path(tmp) / "part", resume=True, **kw)
        ck = load_checkpoint(Path(tmp) / "full", device=DEVICE)
        max_w = max(float((a.detach() - b.detach()).abs().max())
                    for a, b in zip(resumed.model.parameters(), full.model.parameters()))
        return {"steps": full.step, "wall_s": dt, "it_per_s_incl_setup": full.step / dt,
                "first_loss": float(full.losses[0]), "last_loss": float(full.losses[-1]),
                "checkpoint_step": ck.step, "ema_loaded": ck.ema_model is not None, "part_step": part.step,
                "resume_losses_bit_identical": bool(torch.equal(resumed.losses, full.losses)),
                "resume_max_abs_weight_diff": max_w, "passed": ck.step == full.step and resumed.step == full.step
                and bool(torch.isfinite(full.losses).all())}


def couplings() -> dict:
    """Exact OT and Sinkhorn couplings on device tensors: time per call, and exact OT's permutation on the
    device equals the one from the same points on the CPU (the cost is formed on the device, solved on the
    CPU by the compiled solver where it is built, else POT's network simplex)."""
    from steerflow.couplings import ExactOT, Sinkhorn, _native

    out = {"compiled_solver": _native.available(), "passed": True}
    for n in (256,) if QUICK else (256, 1024, 4096):
        g = torch.Generator().manual_seed(n)
        x_0, x_1 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) * 0.5 + 1
        exact, sk = ExactOT(), Sinkhorn(reg=0.05)
        ref = exact.indices(x_0, x_1)
        d_0, d_1 = x_0.to(DEVICE), x_1.to(DEVICE)
        exact.indices(d_0, d_1)  # warm-up
        sync()
        t0 = time.perf_counter()
        sigma = exact.indices(d_0, d_1)
        sync()
        t_exact = time.perf_counter() - t0
        gd = torch.Generator(DEVICE).manual_seed(0)
        sk.indices(d_0, d_1, generator=gd)
        sync()
        t0 = time.perf_counter()
        sk.indices(d_0, d_1, generator=gd)
        sync()
        same = bool(torch.equal(sigma.cpu(), ref))
        out[str(n)] = {"exact_ot_ms": 1e3 * t_exact, "sinkhorn_ms": 1e3 * (time.perf_counter() - t0),
                       "sinkhorn_converged": bool(sk.last_result.converged), "exact_same_as_cpu": same}
        out["passed"] = out["passed"] and same
    return out


def main() -> int:
    env = {"torch": torch.__version__, "device": str(DEVICE), "python": platform.python_version(), "quick": QUICK,
           "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()}, "batch": BATCH,
           "timed_steps": STEPS}
    if CUDA:
        env.update(gpu=torch.cuda.get_device_name(DEVICE), cuda=torch.version.cuda,
                   bf16_supported=torch.cuda.is_bf16_supported(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    from steerflow.models import count_parameters

    env["unet_parameters"] = count_parameters(fresh_model())
    result: dict = {"env": env, "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]])}
    failed = False
    sections = [("train_fp32", lambda: throughput("fp32")), ("train_bf16", lambda: throughput("bf16")),
                ("train_compile_bf16", lambda: throughput("compile_bf16")), ("bf16_vs_fp32", bf16_closeness),
                ("sampling", sampling), ("train_end_to_end", train_end_to_end), ("couplings", couplings)]
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
            if result[name].get("passed") is False:
                failed = True
        except Exception as e:  # record and continue: one broken section must not hide the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            failed = True
        result[name]["section_s"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps({k: v for k, v in result[name].items() if k != 'traceback'})}", flush=True)
    result["passed"] = not failed
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT_PATH}; passed={not failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
