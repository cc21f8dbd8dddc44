"""FlowPipeline on tiny random-weight SD3 / Flux pipelines saved to disk and loaded back by path (no network).

Parity: steerflow's sampler on the pipeline's velocity reproduces the pipeline's own ``__call__`` (same noise,
same prompt) in latents and decoded images. Steering: every method runs on the pipeline, FlowChef never
differentiates the transformer, DPS does, CFG and EnKG see the conditioning repeated over the batch.
"""

import pytest
import torch

import steerflow

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from steerflow.adapters import DecodedOperator, FlowPipeline, PromptEmbeds  # noqa: E402
from steerflow.adapters.pipeline import unpack_latents  # noqa: E402
from steerflow.adapters.tiny import save_tiny_pipeline, tiny_pipeline  # noqa: E402
from steerflow.metrics import Cost  # noqa: E402
from steerflow.steering import (DDS, DPS, OTODE, AvgPool, Blur, ClassifierFreeGuidance, Colorize, EnKG,  # noqa: E402
                                FlowChef, Mask, PnPFlow, SteerflowDefault)

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sd3", "flux-dev", "flux-schnell")}


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: FlowPipeline.from_pretrained(path) for kind, path in folders.items()}


def _with_scheduler(fp: FlowPipeline, **overrides) -> FlowPipeline:
    cfg = dict(fp.scheduler.config)
    cfg.update(overrides)
    fp.pipeline.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    return fp


CASES = [("sd3", {"shift": 1.0}, 7.0), ("sd3", {"shift": 3.0}, 7.0), ("sd3", {"shift": 3.0}, 1.0),
         ("sd3", {"use_dynamic_shifting": True}, 5.0),
         ("flux-dev", {}, 3.5), ("flux-dev", {"use_dynamic_shifting": False, "shift": 1.0}, 2.0),
         ("flux-schnell", {"shift": 1.0}, None), ("flux-schnell", {"shift": 3.0}, None)]


@pytest.mark.parametrize("kind,sched,w", CASES, ids=[f"{k}-{s}-{w}" for k, s, w in CASES])
def test_sampling_matches_the_pipeline_call(folders, kind, sched, w):
    fp = _with_scheduler(FlowPipeline.from_pretrained(folders[kind]), **sched)
    pipe, steps, kw = fp.pipeline, 7, ({} if w is None else {"guidance_scale": w})
    ref = pipe(PROMPT, height=32, width=32, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
               output_type="latent", **kw).images
    ref_img = pipe(PROMPT, height=32, width=32, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    if fp.kind == "flux":
        ref = unpack_latents(ref, 16, 16)

    # the five lines a user writes
    v = fp.velocity(PROMPT, guidance_scale=w)
    z0 = fp.noise(1, height=32, width=32, generator=torch.Generator().manual_seed(3))
    ts = fp.time_grid(steps, height=32, width=32)
    z = steerflow.sample(v, z0, ts=ts)
    img = fp.decode(z)

    assert torch.allclose(ts, 1 - ref_sigmas.double(), atol=1e-7)
    assert (z - ref).abs().max() <= 1e-5, float((z - ref).abs().max())
    assert ((img / 2 + 0.5).clamp(0, 1) - ref_img).abs().max() <= 1e-5
    assert not z.requires_grad  # plain sampling keeps no graph


def test_time_grid_uses_the_mu_shift_of_the_image_size(pipes):
    fp = pipes["flux-dev"]
    small, large = fp.time_grid(10, height=32, width=32), fp.time_grid(10, height=64, width=64)
    assert fp.mu(64, 64) > fp.mu(32, 32)
    # a larger image shifts time toward the noise end: the grid sits lower at every interior point
    assert (large[1:-1] < small[1:-1]).all()
    assert small[0] == 0 and small[-1] == 1
    # the static shift formula: t = 1 − shift σ / (1 + (shift − 1) σ) on σ = linspace(1, 1/n)
    fp3 = pipes["flux-schnell"]
    n = 6
    sig = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    assert torch.allclose(fp3.time_grid(n)[:-1], 1 - sig, atol=1e-7)


def test_every_solver_applies_and_converges(pipes):
    fp = pipes["sd3"]
    v = fp.velocity(PROMPT, guidance_scale=4.0)
    z0 = fp.noise(2, generator=torch.Generator().manual_seed(0))
    fine = steerflow.sample(v, z0, steps=64, method="rk4")
    errs = {}
    for m in ("euler", "midpoint", "heun", "rk4"):
        errs[m] = float((steerflow.sample(v, z0, steps=8, method=m) - fine).abs().max())
    assert errs["rk4"] < errs["heun"] < errs["euler"]
    adaptive = steerflow.sample(v, z0, method="dopri5", atol=1e-5, rtol=1e-5)
    assert (adaptive - fine).abs().max() < 1e-2


def test_classifier_free_guidance_wrapper_equals_the_built_in_one(pipes):
    fp = pipes["sd3"]
    cond, null = fp.encode_prompt(PROMPT), fp.encode_prompt("")
    built_in = fp.velocity(PROMPT, guidance_scale=6.0)
    plain = fp.velocity(PROMPT)  # one branch; ClassifierFreeGuidance supplies the conditions
    z0 = fp.noise(2, generator=torch.Generator().manual_seed(1))
    a = steerflow.sample(built_in, z0, steps=5)
    cost = Cost()
    b = steerflow.sample(plain, z0, steps=5, guidance=ClassifierFreeGuidance(6.0, cond, null), cost=cost)
    assert (a - b).abs().max() < 1e-5
    assert cost.nfe == 10


def test_prompts_are_encoded_once(pipes):
    fp = pipes["flux-schnell"]
    calls = []
    enc = fp.pipeline.encode_prompt
    fp.pipeline.encode_prompt = lambda *a, **k: (calls.append(1), enc(*a, **k))[1]
    try:
        fp.velocity("a new prompt for the cache")
        fp.velocity("a new prompt for the cache")
        fp.generate("a new prompt for the cache", steps=2, output="latent")
    finally:
        fp.pipeline.encode_prompt = enc
    assert len(calls) == 1


def test_several_prompts_and_particles_share_conditioning(pipes):
    fp = pipes["flux-dev"]
    two = fp.encode_prompt(["a cat", "a dog"])
    assert two.batch == 2 and two.expand_to(6).embeds.shape[0] == 6
    # consecutive groups share a prompt
    assert torch.equal(two.expand_to(6).embeds[2], two.embeds[0]) and torch.equal(two.expand_to(6).embeds[3],
                                                                                  two.embeds[1])
    with pytest.raises(ValueError, match="multiple of the number of prompts"):
        two.expand_to(5)
    v = fp.velocity(["a cat", "a dog"])
    z = fp.noise(6, generator=torch.Generator().manual_seed(0))
    t = torch.full((6,), 0.3)
    out = v(z, t)
    single = fp.velocity("a cat")(z[:3], t[:3])
    assert torch.allclose(out[:3], single, atol=1e-5)


def _pixel_problem(fp, kind="box", sigma=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    if kind == "box":
        A = Mask.box((3, 32, 32), 8, 8, 16, 16)
    elif kind == "sr":
        A = AvgPool(4, (3, 32, 32))
    elif kind == "blur":
        A = Blur.motion(5, 30.0, (3, 32, 32))
    else:
        A = Colorize((3, 32, 32))
    y = A(x) + sigma * torch.randn(A(x).shape, generator=g)
    return x, A, y


class _GraphCounter:
    """Counts the forward calls of a module that record an autograd graph (the only way to backprop through it)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        self.n += int(torch.is_tensor(out) and out.requires_grad)

    def close(self):
        self.handle.remove()


def test_flowchef_differentiates_the_decoder_only_and_dps_the_transformer(pipes):
    fp = pipes["sd3"]
    x, A, y = _pixel_problem(fp)
    op = fp.pixel_operator(A)
    assert isinstance(op, DecodedOperator) and not op.linear
    counts = {}
    for name, g in (("flowchef", FlowChef(op, y, 0.05, step_size=0.5)), ("dps", DPS(op, y, 0.05, scale=0.5))):
        tr, dec = _GraphCounter(fp.transformer), _GraphCounter(fp.vae.decoder)
        cost = Cost()
        try:
            z = fp.generate(PROMPT, steps=4, generator=torch.Generator().manual_seed(0), guidance=g, cost=cost,
                            output="latent", height=32, width=32)
        finally:
            tr.close(), dec.close()
        counts[name] = (tr.n, dec.n, cost.vjp)
        assert torch.isfinite(z).all() and not z.requires_grad
    assert counts["flowchef"][0] == 0 and counts["flowchef"][1] >= 4 and counts["flowchef"][2] == 0
    assert counts["dps"][0] >= 4 and counts["dps"][2] >= 4


def test_flowchef_reduces_the_pixel_residual(pipes):
    fp = pipes["flux-schnell"]
    x, A, y = _pixel_problem(fp, "sr", sigma=0.0)
    op = fp.pixel_operator(A)
    res = {}
    for name, g in (("unguided", None), ("flowchef", FlowChef(op, y, 0.0, step_size=2.0, n_inner=2))):
        z = fp.generate(PROMPT, steps=8, generator=torch.Generator().manual_seed(0), guidance=g, output="latent",
                        height=32, width=32)
        with torch.no_grad():
            res[name] = float(((A(fp.decode(z)) - y) ** 2).mean())
    assert res["flowchef"] < 0.7 * res["unguided"], res


@pytest.mark.parametrize("task", ["box", "sr", "blur", "colorize"])
def test_every_method_runs_on_a_pixel_measurement_or_names_the_latent_variant(pipes, task):
    fp = pipes["sd3"]
    x, A, y = _pixel_problem(fp, task)
    op = fp.pixel_operator(A)
    for cls in (SteerflowDefault, DDS, OTODE):
        with pytest.raises(TypeError, match="latent_measurement"):
            cls(op, y, 0.05)
    op_z, y_z = fp.latent_measurement(A, y)
    assert op_z.linear and y_z.shape == (1, 4, 16, 16)
    methods = [FlowChef(op, y, 0.05), DPS(op, y, 0.05), PnPFlow(op, y, 0.05),
               EnKG(op, y, 0.05, ensemble_size=2), SteerflowDefault(op_z, y_z, 0.1), DDS(op_z, y_z, 0.1),
               OTODE(op_z, y_z, 0.1)]
    for g in methods:
        n = 2 if isinstance(g, EnKG) else 1
        z = fp.generate(PROMPT, n=n, steps=3, generator=torch.Generator().manual_seed(0), guidance=g,
                        output="latent", height=32, width=32, guidance_scale=3.0)
        assert z.shape == (n, 4, 16, 16) and torch.isfinite(z).all(), type(g).__name__


def test_latent_mask_observes_only_fully_kept_cells(pipes):
    fp = pipes["sd3"]
    keep = torch.ones(3, 32, 32, dtype=torch.bool)
    keep[:, 5:11, 8:16] = False  # rows 5..10 touch latent rows 2..5, cols 8..15 are latent cols 4..7
    op_z, y_z = fp.latent_measurement(Mask(keep), torch.zeros(1, 3, 32, 32))
    hidden = ~op_z.mask[0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:6, 4:8] = True
    assert torch.equal(hidden, expected)


def test_enkg_particles_per_image_repeat_the_prompt(pipes):
    fp = pipes["flux-dev"]
    x, A, y = _pixel_problem(fp, "box")
    g = EnKG(fp.pixel_operator(A), torch.cat([y, y]).repeat_interleave(3, 0), 0.05, ensemble_size=3)
    z = fp.generate(["a cat", "a dog"], n=3, steps=3, generator=torch.Generator().manual_seed(0), guidance=g,
                    output="latent", height=32, width=32)
    assert z.shape == (6, 4, 16, 16) and torch.isfinite(z).all()


def test_encode_decode_and_chunking(pipes):
    fp = pipes["flux-schnell"]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = fp.encode(x)
        assert z.shape == (3, 4, 16, 16)
        whole, chunked = fp.decode(z), fp.decode(z, chunk_size=2)
    assert whole.shape == (3, 3, 32, 32)
    assert torch.allclose(whole, chunked, atol=1e-5)
    # the scaling and shift factors: encode is (mode − shift) · scaling
    with torch.no_grad():
        raw = fp.vae.encode(x).latent_dist.mode()
    cfg = fp.vae.config
    assert torch.allclose(z, (raw - cfg.shift_factor) * cfg.scaling_factor, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 4"):
        fp.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="unpacked latents"):
        fp.decode(torch.zeros(1, 16, 8, 8))


def test_inversion_round_trip(pipes):
    fp = pipes["sd3"]
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z1 = fp.encode(x)
    noise = fp.invert(x, "", steps=60, method="heun")
    back = steerflow.sample(fp.velocity(""), noise, ts=fp.time_grid(60), method="heun")
    assert (back - z1).abs().max() < 2e-2 * z1.abs().max()
    edited = fp.edit(x, "a dog", steps=6, eta=1.0, window=(0.0, 1.0), output="latent")
    assert (edited - z1).abs().max() < 1e-4  # η = 1 on the whole window returns the reference exactly


def test_bf16_pipeline_runs_and_stays_close(folders):
    fp32 = FlowPipeline.from_pretrained(folders["flux-schnell"])
    bf16 = FlowPipeline.from_pretrained(folders["flux-schnell"], torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    z0 = fp32.noise(1, generator=torch.Generator().manual_seed(0))
    a = steerflow.sample(fp32.velocity(PROMPT), z0, ts=fp32.time_grid(4))
    b = steerflow.sample(bf16.velocity(PROMPT), z0, ts=bf16.time_grid(4))
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_loading_errors_are_clear(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        FlowPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        FlowPipeline.from_pretrained(tmp_path / "plain")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                 norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(str(tmp_path / "ddpm"))
    with pytest.raises(TypeError, match="not a flow-matching pipeline"):
        FlowPipeline.from_pretrained(tmp_path / "ddpm")


def test_a_prompt_without_text_encoders_is_refused(folders):
    fp = FlowPipeline.from_pretrained(folders["flux-schnell"], text_encoder=None, text_encoder_2=None,
                                      tokenizer=None, tokenizer_2=None)
    with pytest.raises(ValueError, match="without text encoders"):
        fp.velocity(PROMPT)
    full = FlowPipeline.from_pretrained(folders["flux-schnell"])
    embeds = full.encode_prompt(PROMPT)
    z = fp.generate(prompt_embeds=embeds, steps=2, output="latent", generator=torch.Generator().manual_seed(0))
    ref = full.generate(PROMPT, steps=2, output="latent", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, ref, atol=1e-6)


def test_guidance_options_are_checked(pipes):
    with pytest.raises(ValueError, match="no guidance embedding"):
        pipes["flux-schnell"].velocity(PROMPT, guidance_scale=3.0)
    with pytest.raises(ValueError, match="negative"):
        pipes["flux-dev"].velocity(PROMPT, negative_prompt="blurry")
    with pytest.raises(ValueError, match="multiples of 2"):
        pipes["sd3"].noise(1, height=31, width=32)
    with pytest.raises(TypeError, match="PromptEmbeds"):
        pipes["sd3"].velocity(PROMPT)(pipes["sd3"].noise(1), torch.zeros(1), "text")
    assert isinstance(pipes["sd3"].encode_prompt(PROMPT), PromptEmbeds)


def test_tiny_pipeline_is_deterministic():
    a, b, c = (tiny_pipeline("flux-schnell", seed=s) for s in (5, 5, 6))
    for (ka, va), (kb, vb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # the seed is what fixes them: another seed gives other weights
    assert not all(torch.equal(va, vc) for va, vc in zip(a.transformer.state_dict().values(),
                                                        c.transformer.state_dict().values()))


def test_readme_snippet_runs_on_a_tiny_pipeline(folders, tmp_path):
    # the README's "steer Stable Diffusion 3 / Flux from a local folder" lines, at 32² on the CPU
    from PIL import Image

    from steerflow.data import load_image

    Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        tmp_path / "photo.png")
    pipe = FlowPipeline.from_pretrained(folders["sd3"], torch_dtype=torch.float32, device="cpu")
    with pytest.warns(UserWarning, match="resized"):
        x = load_image(tmp_path / "photo.png", size=(32, 32))
    A = Mask.box((3, 32, 32), 8, 8, 16, 16)
    images = pipe.generate("a cat on a sofa", steps=3, guidance=FlowChef(pipe.pixel_operator(A), A(x), step_size=0.5))
    edited = pipe.edit(x, "a cat on a sofa, oil painting", steps=3)
    assert images.shape == edited.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all() and torch.isfinite(edited).all()
