"""Tests for dit_fast.diffusion (drop-in for facebookresearch/DiT's `diffusion` package).

Golden values in tests/data/golden_A.pt were computed with the official DiT code; see the
record layout in the module docstring of `_golden_cases` below.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dit_fast
from dit_fast.diffusion import create_diffusion, space_timesteps
from dit_fast.diffusion.diffusion_utils import mean_flat, normal_kl
from dit_fast.diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType
from dit_fast.diffusion.respace import SpacedDiffusion
from dit_fast.diffusion.timestep_sampler import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

RTOL, ATOL = 1e-5, 1e-6


def _load_model(record):
    from dit_fast.models import DiT

    model = DiT(**record["config"])
    model.load_state_dict(record["state_dict"], strict=True)
    return model.eval()


def _golden_cases():
    """(model index, timestep_respacing) pairs present in the golden file.

    Each record: config, state_dict, y, and diffusion[respacing] with x0, noise, t (indices into
    the respaced schedule), losses {mse, vb, loss}, x_t, p_mean_variance outputs (mean, variance,
    log_variance, pred_xstart; clip_denoised=False), ddim_sample, num_timesteps, timestep_map.
    """
    from conftest import _golden

    return [(i, r) for i, rec in enumerate(_golden()["models"]) for r in rec["diffusion"]]


GOLDEN_CASES = _golden_cases()


def _max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs() / expected.abs().clamp_min(ATOL / RTOL)).max().item()


def _close(actual, expected, name):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Golden comparison with the official implementation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_idx,respacing", GOLDEN_CASES, ids=[f"m{i}-{r or 'full'}" for i, r in GOLDEN_CASES])
def test_golden_schedule(golden, model_idx, respacing):
    record = golden["models"][model_idx]
    ref = record["diffusion"][respacing]
    diffusion = create_diffusion(timestep_respacing=respacing, learn_sigma=record["config"]["learn_sigma"])
    assert diffusion.num_timesteps == ref["num_timesteps"]
    assert torch.equal(torch.tensor(diffusion.timestep_map), ref["timestep_map"])
    _close(diffusion.q_sample(ref["x0"], ref["t"], ref["noise"]), ref["x_t"], "x_t")


@pytest.mark.parametrize("model_idx,respacing", GOLDEN_CASES, ids=[f"m{i}-{r or 'full'}" for i, r in GOLDEN_CASES])
def test_golden_model_outputs(golden, model_idx, respacing):
    # The diffusion math is what is checked here, so the model runs on the reference backend (the
    # official math). The fused model path is checked against the golden outputs in test_model.py:
    # pred_xstart = sqrt(1/abar) x - sqrt(1/abar - 1) eps multiplies the model's round-off by up to
    # ~157 at t = 999, which would turn a 1e-7 kernel difference into a diffusion "mismatch".
    record = golden["models"][model_idx]
    ref = record["diffusion"][respacing]
    model = _load_model(record)
    kwargs = dict(y=record["y"])
    diffusion = create_diffusion(timestep_respacing=respacing, learn_sigma=record["config"]["learn_sigma"])

    with torch.no_grad(), dit_fast.use_backend("reference"):
        losses = diffusion.training_losses(model, ref["x0"], ref["t"], kwargs, noise=ref["noise"])
        assert set(ref["losses"]) <= set(losses)
        for key, expected in ref["losses"].items():
            assert losses[key].shape == expected.shape
            _close(losses[key], expected, f"losses[{key!r}]")

        out = diffusion.p_mean_variance(model, ref["x_t"], ref["t"], clip_denoised=False, model_kwargs=kwargs)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            _close(out[key], ref[key], key)

        # The golden ddim_sample was produced with clip_denoised=False (True does not match).
        sample = diffusion.ddim_sample(model, ref["x_t"], ref["t"], clip_denoised=False, model_kwargs=kwargs, eta=0)
        _close(sample["sample"], ref["ddim_sample"], "ddim_sample")


# ----------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------


def test_linear_schedule_matches_ho_et_al():
    d = create_diffusion("", learn_sigma=False)
    assert d.betas.dtype == np.float64 and d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)


def test_cosine_schedule():
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    np.testing.assert_allclose(d.betas, expected, rtol=1e-12)
    assert (np.diff(d.alphas_cumprod) < 0).all() and d.betas.max() <= 0.999


def test_q_posterior_matches_closed_form():
    d = create_diffusion("250")
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 1, 100, 249])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)

    abar = np.cumprod(1 - d.betas)
    abar_prev = np.append(1.0, abar[:-1])
    ti = t.numpy()
    c1 = d.betas[ti] * np.sqrt(abar_prev[ti]) / (1 - abar[ti])
    c2 = (1 - abar_prev[ti]) * np.sqrt(1 - d.betas[ti]) / (1 - abar[ti])
    post_var = d.betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    bc = lambda a: torch.tensor(a, dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    _close(mean, bc(c1) * x0 + bc(c2) * xt, "posterior mean")
    _close(var, bc(post_var[ti]).expand_as(x0), "posterior variance")
    _close(logvar, bc(post_logvar[ti]).expand_as(x0), "posterior log variance")


@pytest.mark.parametrize("respacing,count", [("250", 250), ("ddim50", 50), ("10,10,10", 30), ("25", 25), ("", 1000)])
def test_respacing_counts(respacing, count):
    d = create_diffusion(respacing)
    assert d.num_timesteps == len(d.timestep_map) == count
    assert d.timestep_map == sorted(d.timestep_map) and d.timestep_map[0] == 0
    # a respaced process keeps the base process's cumulative alphas at the kept steps
    base = create_diffusion("")
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)


def test_respacing_layouts():
    assert create_diffusion("ddim50").timestep_map == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim3") == {0, 334, 668}
    # "10,10,10": sections of 334, 333, 333 steps, each strided to 10 steps incl. both ends
    steps = create_diffusion("10,10,10").timestep_map
    sections = [steps[:10], steps[10:20], steps[20:]]
    assert [(s[0], s[-1]) for s in sections] == [(0, 333), (334, 666), (667, 999)]
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert create_diffusion("250").timestep_map[-1] == 999


# ----------------------------------------------------------------------------------------------
# Samplers on a tiny model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(golden):
    record = golden["models"][0]
    model = _load_model(record)
    cfg = record["config"]
    shape = (2, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    return model, shape, dict(y=torch.tensor([1, 3]))


def test_p_sample_step_formula(tiny):
    model, shape, kwargs = tiny
    d = create_diffusion("25")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 7])
    with torch.no_grad():
        torch.manual_seed(5)
        out = d.p_sample(model, x, t, clip_denoised=False, model_kwargs=kwargs)
        pmv = d.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=kwargs)
    torch.manual_seed(5)
    noise = torch.randn_like(x)
    expected = pmv["mean"] + torch.tensor([0.0, 1.0]).view(-1, 1, 1, 1) * torch.exp(0.5 * pmv["log_variance"]) * noise
    _close(out["sample"], expected, "p_sample")
    _close(out["pred_xstart"], pmv["pred_xstart"], "pred_xstart")
    # p_mean_variance's mean is the posterior mean at the predicted x_0
    _close(pmv["mean"], d.q_posterior_mean_variance(pmv["pred_xstart"], x, t)[0], "mean")


def test_p_sample_loop_deterministic_and_progress(tiny, capsys):
    model, shape, kwargs = tiny
    d = create_diffusion("10")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    runs = []
    for progress in (False, True):
        torch.manual_seed(123)
        runs.append(d.p_sample_loop(model, shape, noise=noise.clone(), clip_denoised=False,
                                    model_kwargs=kwargs, progress=progress))
    assert runs[0].shape == shape and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert "10/10" in capsys.readouterr().err  # tqdm progress bar

    steps = list(d.p_sample_loop_progressive(model, shape, noise=noise, model_kwargs=kwargs))
    assert len(steps) == 10 and all(s["sample"].shape == shape for s in steps)


def test_ddim_sample_loop_deterministic(tiny, capsys):
    model, shape, kwargs = tiny
    d = create_diffusion("ddim10")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    a = d.ddim_sample_loop(model, shape, noise=noise, model_kwargs=kwargs, progress=True)
    torch.manual_seed(1)  # eta = 0: independent of the RNG
    b = d.ddim_sample_loop(model, shape, noise=noise, model_kwargs=kwargs)
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert "10/10" in capsys.readouterr().err
    steps = list(d.ddim_sample_loop_progressive(model, shape, noise=noise, model_kwargs=kwargs, eta=0.5))
    assert len(steps) == 10 and torch.isfinite(steps[-1]["sample"]).all()


def test_ddim_reverse_inverts_ddim(tiny):
    model, shape, kwargs = tiny
    d = create_diffusion("ddim25")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.5
    t = torch.full((shape[0],), 3)
    with torch.no_grad():
        fwd = d.ddim_reverse_sample(model, x, t, clip_denoised=False, model_kwargs=kwargs)["sample"]
        # closed form of the reverse step
        out = d.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=kwargs)
    abar, abar_next = d.alphas_cumprod[3], d.alphas_cumprod_next[3]
    eps = (x / math.sqrt(abar) - out["pred_xstart"]) / math.sqrt(1 / abar - 1)
    expected = out["pred_xstart"] * math.sqrt(abar_next) + math.sqrt(1 - abar_next) * eps
    torch.testing.assert_close(fwd, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_reverse_sample(model, x, t, model_kwargs=kwargs, eta=0.5)


def test_vb_and_calc_bpd_loop(tiny):
    model, shape, kwargs = tiny
    d = create_diffusion("5")
    x0 = torch.rand(shape, generator=torch.Generator().manual_seed(6)) * 2 - 1
    out = d.calc_bpd_loop(model, x0, clip_denoised=True, model_kwargs=kwargs)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (shape[0], 5)
    _close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], "total_bpd")
    assert all(torch.isfinite(v).all() for v in out.values())
    # prior term: KL(q(x_T | x_0) || N(0, I)) in bits
    abar = d.alphas_cumprod[-1]
    prior = normal_kl(math.sqrt(abar) * x0, math.log(1 - abar), torch.zeros(()), 0.0)
    _close(out["prior_bpd"], mean_flat(prior) / math.log(2), "prior_bpd")


def test_loss_variants(tiny):
    model, shape, kwargs = tiny
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0, 13])
    with torch.no_grad():
        mse = create_diffusion("25").training_losses(model, x0, t, kwargs, noise=noise)
        kl_d = create_diffusion("25", use_kl=True)
        assert kl_d.loss_type == LossType.RESCALED_KL
        kl = kl_d.training_losses(model, x0, t, kwargs, noise=noise)
        resc = create_diffusion("25", rescale_learned_sigmas=True).training_losses(model, x0, t, kwargs, noise=noise)
    assert set(kl) == {"loss"}
    _close(kl["loss"], mse["vb"] * 25, "rescaled kl")
    _close(resc["vb"], mse["vb"] * 25 / 1000, "rescaled mse vb")
    _close(resc["loss"], resc["mse"] + resc["vb"], "rescaled mse loss")


def test_fixed_variance_and_xstart_prediction():
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    large = create_diffusion("", learn_sigma=False)
    xstart = create_diffusion("", learn_sigma=False, predict_xstart=True)
    assert small.model_var_type == ModelVarType.FIXED_SMALL and large.model_var_type == ModelVarType.FIXED_LARGE
    assert xstart.model_mean_type == ModelMeanType.START_X
    model = lambda x, t, **kw: 0.5 * x  # noqa: E731  (stand-in, C output channels)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([0, 1, 999])
    o_small = small.p_mean_variance(model, x, t)
    o_large = large.p_mean_variance(model, x, t)
    _close(o_small["variance"][:, 0, 0, 0], torch.tensor(small.posterior_variance[[0, 1, 999]], dtype=torch.float32), "small")
    lv = np.append(large.posterior_variance[1], large.betas[1:])[[0, 1, 999]]
    _close(o_large["variance"][:, 0, 0, 0], torch.tensor(lv, dtype=torch.float32), "large")
    assert o_large["variance"].shape == x.shape
    _close(xstart.p_mean_variance(model, x, t, clip_denoised=False)["pred_xstart"], 0.5 * x, "start_x")
    losses = xstart.training_losses(model, x, t, noise=torch.zeros_like(x))
    assert set(losses) == {"mse", "loss"}
    x_t = torch.tensor(xstart.sqrt_alphas_cumprod[[0, 1, 999]], dtype=torch.float32).view(-1, 1, 1, 1) * x
    _close(losses["mse"], mean_flat((x - 0.5 * x_t) ** 2), "start_x mse")
    sample = large.p_sample_loop(model, (3, 2, 4, 4), device="cpu")  # callable without parameters
    assert sample.shape == (3, 2, 4, 4) and torch.isfinite(sample).all()


def test_wrapped_model_sees_original_timesteps():
    d = create_diffusion("ddim10")
    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.p_mean_variance(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 9]))
    assert seen[0].tolist() == [0, 900]
    assert isinstance(d, SpacedDiffusion)


def test_timestep_samplers():
    d = create_diffusion("25")
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    ts, w = UniformSampler(d).sample(8, "cpu")
    assert ts.shape == w.shape == (8,) and ts.dtype == torch.long and (w == 1).all()
    s = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(s, LossSecondMomentResampler)
    for _ in range(s.history_per_term):
        s.update_with_all_losses(list(range(25)), [float(i + 1) for i in range(25)])
    w = s.weights()
    assert w.shape == (25,) and math.isclose(w.sum(), 1.0) and w[-1] > w[0]
    with pytest.raises(ValueError, match="name"):
        create_named_schedule_sampler("nope", d)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(timestep_respacing="", noise_schedule="cosine"), "noise_schedule"),
        (dict(timestep_respacing="abc"), "timestep_respacing"),
        (dict(timestep_respacing="10,x,10"), "timestep_respacing"),
        (dict(timestep_respacing="ddimx"), "timestep_respacing"),
        (dict(timestep_respacing="ddim999"), "timestep_respacing"),
        (dict(timestep_respacing="2000"), "timestep_respacing"),
        (dict(timestep_respacing="10,501"), "timestep_respacing"),
        (dict(timestep_respacing="", diffusion_steps=0), "diffusion_steps"),
    ],
)
def test_create_diffusion_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion(**kwargs)


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(100, [60, 10])
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(100, "1;2")


def test_shape_validation():
    d = create_diffusion("25")
    x = torch.zeros(3, 2, 4, 4)
    model = lambda x, t, **kw: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # noqa: E731
    for bad_t in (torch.zeros(2, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), torch.zeros(3)):
        with pytest.raises(ValueError, match=r"\bt must"):
            d.q_sample(x, bad_t)
        with pytest.raises(ValueError, match=r"\bt must"):
            d.training_losses(model, x, bad_t)
        with pytest.raises(ValueError, match=r"\bt must"):
            d.p_mean_variance(model, x, bad_t)
    t = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="noise"):
        d.q_sample(x, t, noise=torch.zeros(3, 2, 4, 5))
    with pytest.raises(ValueError, match="model output"):
        d.p_mean_variance(lambda x, t: x, x, t)  # learned sigma needs 2C channels
    with pytest.raises(ValueError, match="noise"):
        d.p_sample_loop(model, (3, 2, 4, 4), noise=torch.zeros(3, 2, 4, 5))


@pytest.mark.parametrize("bad", [-1, 1000, 25])
def test_timesteps_out_of_range(bad):
    # t = -1 used to wrap to the last step silently, and t = num_timesteps raised an IndexError
    x = torch.zeros(2, 2, 4, 4)
    model = lambda x, t, **kw: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # noqa: E731
    d = create_diffusion("" if bad != 25 else "25")
    t = torch.tensor([0, bad])
    T = d.num_timesteps
    match = rf"t must hold timesteps in \[0, {T - 1}\] \(this diffusion has {T} steps\), got values in"
    for call in (lambda: d.q_sample(x, t), lambda: d.training_losses(model, x, t),
                 lambda: d.q_mean_variance(x, t), lambda: d.q_posterior_mean_variance(x, x, t),
                 lambda: d.p_mean_variance(model, x, t), lambda: d.p_sample(model, x, t),
                 lambda: d.ddim_sample(model, x, t)):
        with pytest.raises(ValueError, match=match):
            call()
    d.q_sample(x, torch.tensor([0, T - 1]))  # the ends are fine


def test_integer_respacing():
    # an int is one section, like its string (the official code raises a TypeError)
    assert create_diffusion(250).timestep_map == create_diffusion("250").timestep_map
    assert space_timesteps(1000, np.int64(10)) == space_timesteps(1000, "10")
    for bad in (True, 2.5, [10, 2.5]):
        with pytest.raises(ValueError, match="timestep_respacing"):
            create_diffusion(bad)


def test_one_step_ancestral_sampling_refused_up_front():
    d = create_diffusion("1")
    calls = []

    def model(x, t, **kw):
        calls.append(1)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    match = "ancestral \\(DDPM\\) sampling needs a diffusion of at least 2 steps.*use DDIM"
    with pytest.raises(ValueError, match=match):
        d.p_sample_loop(model, (2, 2, 4, 4), device="cpu")
    with pytest.raises(ValueError, match=match):
        d.p_sample(model, torch.zeros(2, 2, 4, 4), torch.zeros(2, dtype=torch.long))
    assert calls == []  # refused before any model call
    # DDIM takes a single step
    assert d.ddim_sample_loop(model, (2, 2, 4, 4), device="cpu").shape == (2, 2, 4, 4)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_cfg_step_refuses_non_finite_scale(scale):
    d = create_diffusion("10")
    x = torch.zeros(2, 2, 4, 4)
    out = torch.zeros(4, 4, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    for step in (d.p_sample_step_cfg, d.ddim_step_cfg):
        with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
            step(out, x, t, torch.zeros_like(x), scale)
