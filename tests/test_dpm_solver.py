"""DPM-Solver++(2M) (dit_fast.diffusion.dpm_solver)."""
import numpy as np
import pytest
import torch

from dit_fast import DiT
from dit_fast.diffusion.dpm_solver import create_dpm_solver, dpm_solver_pp_update
from dit_fast.diffusion.gaussian_diffusion import get_named_beta_schedule
from dit_fast.diffusion.respace import SpacedDiffusion
from dit_fast.diffusion import gaussian_diffusion as gd


def _toy_eps(seed=0, channels=4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(channels, channels, generator=g) * 0.3

    def eps(x, t):
        return torch.tanh(torch.einsum("ij,njhw->nihw", W.to(x.dtype), x)) * (t.to(x.dtype).view(-1, 1, 1, 1) / 1000 + 0.5)
    return eps


def _diffusers_scheduler(algorithm_type, steps):
    """diffusers' DPMSolverMultistepScheduler set up as our solver (DiT's linear schedule, order 2)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, solver_order=2,
        algorithm_type=algorithm_type, prediction_type="epsilon", final_sigmas_type="zero",
        timestep_spacing="linspace")
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
@pytest.mark.slow
def test_matches_diffusers_dpmsolver_multistep(steps):
    sched = _diffusers_scheduler("dpmsolver++", steps)
    eps = _toy_eps()
    x_T = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(eps(x, t.expand(3)), t, x).prev_sample
    solver = create_dpm_solver(steps)
    assert solver.timesteps.tolist() == sched.timesteps.tolist()
    ours = solver.sample_loop(eps, x_T.shape, noise=x_T.float())
    scale = x.abs().max().item()
    assert (ours.double() - x).abs().max().item() < 2e-6 * scale


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_sde_variant_matches_diffusers_sde_dpmsolver(steps):
    """SDE-DPM-Solver++(2M) == diffusers' algorithm_type="sde-dpmsolver++" given the same noise."""
    sched = _diffusers_scheduler("sde-dpmsolver++", steps)
    eps = _toy_eps()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    zs = torch.randn(steps, 3, 4, 6, 6, generator=g, dtype=torch.float64)
    x = x_T.clone()
    for k, t in enumerate(sched.timesteps):
        x = sched.step(eps(x, t.expand(3)), t, x, variance_noise=zs[k]).prev_sample
    solver = create_dpm_solver(steps, sde=True)
    ours, state = x_T.clone(), solver.init_state(x_T)
    for k in range(steps):
        ours, state, _ = solver.step(eps, ours, torch.full((3,), k), state, noise=zs[k])
    assert (ours - x).abs().max().item() < 2e-6 * x.abs().max().item()  # diffusers steps in float32
    # the loops draw fresh noise every step: different seeds, different samples
    a = solver.sample_loop(eps, x_T.shape, noise=x_T.float())
    b = solver.sample_loop(eps, x_T.shape, noise=x_T.float())
    assert steps == 1 or not torch.equal(a, b)


def test_first_order_is_ddim_on_the_same_grid():
    """DPM-Solver++(1) == DDIM (eta = 0) through the official-API ddim_sample_loop on the same timesteps."""
    solver = create_dpm_solver(8, order=1)
    diffusion = SpacedDiffusion(use_timesteps=set(solver.timesteps.tolist()),
                                betas=get_named_beta_schedule("linear", 1000),
                                model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
                                loss_type=gd.LossType.MSE)
    eps = _toy_eps(2)

    def learned_sigma_model(x, t):          # eps + a variance channel block the solver must ignore
        return torch.cat([eps(x, t), torch.full_like(x, 0.3)], dim=1)

    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    ddim = diffusion.ddim_sample_loop(learned_sigma_model, x_T.shape, noise=x_T, clip_denoised=False)
    ours = solver.sample_loop(learned_sigma_model, x_T.shape, noise=x_T)
    torch.testing.assert_close(ours, ddim, rtol=1e-4, atol=1e-4)


def _gaussian_eps(solver, s):
    """Exact eps for data ~ N(0, s^2 I): eps(x_t) = sigma_t x_t / (alpha_t^2 s^2 + sigma_t^2)."""
    ab = torch.tensor(solver.alphas_cumprod)

    def eps(x, t):
        a = ab[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * s * s + 1 - a)
    return eps


@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR"])
def test_converges_to_the_probability_flow_solution(skip_type):
    """For Gaussian data the ODE maps x_T to x_T * s / std_T; second order beats first order."""
    s = 0.5
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    errs = {}
    for order in (1, 2):
        for steps in (10, 80):
            solver = create_dpm_solver(steps, order=order, skip_type=skip_type)
            a = solver.alphas_cumprod[999]
            exact = x_T * s / np.sqrt(a * s * s + 1 - a)
            out = solver.sample_loop(_gaussian_eps(solver, s), x_T.shape, noise=x_T)
            errs[order, steps] = (out - exact).abs().max().item()
    assert errs[2, 80] < errs[2, 10] / 10
    assert errs[2, 80] < 5e-3
    assert errs[2, 10] < errs[1, 10]
    assert errs[2, 80] < errs[1, 80] / 10


def test_update_formula_and_clipping():
    x, eps, prev = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    coefs = torch.tensor([0.8, 0.6, 0.5, 0.3, -0.1, 0.0])
    x_next, x0 = dpm_solver_pp_update(x, eps, prev, coefs)
    torch.testing.assert_close(x0, (x - 0.6 * eps) / 0.8)
    torch.testing.assert_close(x_next, 0.5 * x + 0.3 * x0 - 0.1 * prev)
    _, x0c = dpm_solver_pp_update(x * 10, eps, prev, coefs, clip_denoised=True)
    assert x0c.abs().max() <= 1.0
    # a clipped run ends inside [-1, 1]: the last update returns the data prediction
    solver = create_dpm_solver(5)
    out = solver.sample_loop(lambda x, t: -3 * x, (2, 1, 4, 4), noise=torch.randn(2, 1, 4, 4), clip_denoised=True)
    assert out.abs().max() <= 1.0


def test_time_grids_and_coefficients():
    tu = create_dpm_solver(10)
    assert tu.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    for skip in ("logSNR", "time_quadratic"):
        for steps in (5, 50, 200):
            grid = create_dpm_solver(steps, skip_type=skip).timesteps
            assert len(grid) == steps and grid[0] == 999 and (np.diff(grid) < 0).all() and grid[-1] >= 0
    # the last step jumps to zero noise (x_next = x0), the first is first order (no history term)
    assert tu.coefs[-1, 2:].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert tu.coefs[0, 4] == 0.0 and tu.coefs[1, 4] != 0.0
    assert create_dpm_solver(10, order=1).coefs[:, 4].tolist() == [0.0] * 10
    # a cosine-schedule solver uses that schedule
    cos = create_dpm_solver(10, noise_schedule="squaredcos_cap_v2")
    assert not np.allclose(cos.alphas_cumprod, tu.alphas_cumprod)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=1001), "num_steps"),
    (dict(num_steps=10, order=3), "order"),
    (dict(num_steps=10, skip_type="karras"), "skip_type"),
    (dict(num_steps=10, noise_schedule="cosine"), "noise_schedule"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_dpm_solver(**kwargs)


def test_rejects_bad_model_output():
    solver = create_dpm_solver(3)
    with pytest.raises(ValueError, match="model output"):
        solver.sample_loop(lambda x, t: x[:, :1], (1, 2, 4, 4), noise=torch.randn(1, 2, 4, 4))


def test_dit_with_guidance_runs_and_is_deterministic():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=5).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.02)
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 3, 5, 5])
    solver = create_dpm_solver(6)
    kw = dict(y=y, cfg_scale=4.0)
    a = solver.sample_loop(model.forward_with_cfg, (4, 4, 8, 8), noise=torch.cat([z, z]), model_kwargs=kw)
    b = solver.sample_loop(model.forward_with_cfg, (4, 4, 8, 8), noise=torch.cat([z, z]), model_kwargs=kw)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    # the guided channels of both halves agree (forward_with_cfg returns the guided eps twice)
    torch.testing.assert_close(a[:2, :3], a[2:, :3])
    steps = list(solver.sample_loop_progressive(model.forward_with_cfg, (4, 4, 8, 8), noise=torch.cat([z, z]),
                                                model_kwargs=kw))
    assert len(steps) == 6 and torch.equal(steps[-1]["sample"], a)
    assert torch.equal(steps[-1]["sample"], steps[-1]["pred_xstart"])


def _available_step_backends():
    from dit_fast import backends
    return [name for name, info in backends().items()
            if name in ("reference", "cpu", "triton") and info.available and "sampler_step" in info.ops]


@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_equals_reference_update(clip, dtype, sde):
    """The solver's fused sampler step (DDIM mode with remapped coefficients, x0_prev in the noise
    slot) reproduces dpm_solver_pp_update step by step, on every backend available here."""
    from dit_fast import use_backend
    solver = create_dpm_solver(7, sde=sde)
    eps_fn = _toy_eps(channels=3)
    # learned-sigma shaped output: only the eps half may be used
    model = lambda x, t: torch.cat([eps_fn(x, t) * 4, torch.full_like(x, 7.0)], dim=1)  # noqa: E731
    x_init = torch.randn(2, 3, 5, 3, dtype=dtype)  # 15 pixels: not a multiple of any block size
    ulp = torch.finfo(dtype).eps
    for backend in _available_step_backends():
        if backend == "triton" and dtype == torch.float64:
            continue  # the triton kernel has no float64 (a forced backend would raise)
        x, state = x_init.clone(), solver.init_state(x_init)
        for i in range(solver.num_steps):
            x_in, x0_prev = x, state["x0_prev"]
            it = torch.full((2,), i, dtype=torch.long)
            z = torch.randn_like(x_in) if sde else None
            with torch.no_grad(), use_backend(backend):
                x, state, x0 = solver.step(model, x_in, it, state, clip_denoised=clip, noise=z)
            eps = model(x_in, torch.full((2,), int(solver.timesteps[i])))[:, :3]
            coefs = torch.from_numpy(solver.coefs[i]).to(dtype)
            x_ref, x0_ref = dpm_solver_pp_update(x_in, eps, x0_prev, coefs, clip, z)
            assert x.dtype == dtype
            # the same arithmetic up to the association of a few products: a few ulp of the size of
            # the terms summed, (|x| + sigma |eps|) / alpha (clipping can hide that size in the result)
            alpha, sigma = coefs[0].item(), coefs[1].item()
            scale = max(((x_in.abs() + sigma * eps.abs()) / alpha).max().item(), x0_prev.abs().max().item(), 1.0)
            for got, want, what in ((x0, x0_ref, "x0"), (x, x_ref, "x_next")):
                err = (got - want).abs().max().item()
                assert err <= 8 * ulp * scale, (backend, i, what, err, scale)
