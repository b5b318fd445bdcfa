"""dit_fast.ops.sampler_step: the fused DDPM / DDIM sampler step, every available backend against
the unfused PyTorch code of GaussianDiffusion (which the golden tests tie to the official code).

The fused step reproduces the unfused one operation by operation; in float32 they agree to
<= 1e-6 relative (measured: bitwise equal for DDIM and where exp agrees, 1 ulp where the C library's
expf differs from PyTorch's vectorized exp).
"""

import importlib

import pytest
import torch

from dit_fast._backends import use_backend
from dit_fast.diffusion import create_diffusion
from dit_fast.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_fast.ops import ddim_step, ddpm_step
from op_helpers import BACKEND_DEVICES, compile_and_trace, match_cases, needs_c, require

S = importlib.import_module("dit_fast.ops.sampler_step")
OP = S.OP_NAME
RTOL = ATOL = 1e-6


def unfused(d, method, *args, **kwargs):
    """Runs `d.<method>` with the fused path switched off (the pre-existing PyTorch code)."""
    orig = GaussianDiffusion._fused_step_applies
    GaussianDiffusion._fused_step_applies = lambda *a, **k: False
    try:
        return getattr(d, method)(*args, **kwargs)
    finally:
        GaussianDiffusion._fused_step_applies = orig


def make(learn_sigma, mdt=torch.float32, xdt=torch.float32, shape=(3, 4, 5, 6), device="cpu",
         batch_mult=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g).to(device=device, dtype=xdt)
    noise = torch.randn(shape, generator=g).to(device=device, dtype=xdt)
    mo = (1.5 * torch.randn(N * batch_mult, 2 * C if learn_sigma else C, *shape[2:], generator=g))
    mo[:, C:] = mo[:, C:].clamp(-1, 1) if learn_sigma else mo[:, C:]
    return mo.to(device=device, dtype=mdt), x, noise


VAR_TYPES = {"learned": ("", True, None), "fixed_small": ("", False, None),
             "fixed_large": ("", False, "large")}


def diffusion(var, steps="25"):
    _, learn, _ = VAR_TYPES[var]
    return create_diffusion(steps, learn_sigma=learn, sigma_small=(var == "fixed_small"))


DTYPE_COMBOS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                (torch.float64, torch.float64)]
COMBO_IDS = ["f32", "bf16-model", "bf16", "f16-model", "f64"]


def require_model_dtype(backend, mdt):
    if backend != "reference" and mdt not in S._MODEL_DTYPES[backend]:
        pytest.skip(f"the {backend} kernel does not take a {mdt} model output")


def close(a, b, msg=""):
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")


# ---- fused == unfused, through GaussianDiffusion ---------------------------------------------

@pytest.mark.parametrize("combo", DTYPE_COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("var", list(VAR_TYPES))
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ddpm_step_matches_unfused(backend, device, var, combo):
    mdt, xdt = combo
    require(OP, backend, device, xdt)
    require_model_dtype(backend, mdt)
    d = diffusion(var)
    mo, x, noise = make(VAR_TYPES[var][1], mdt, xdt, device=device)
    t = torch.tensor([0, 7, 24], device=device)
    for clip in (False, True):
        with use_backend(backend):
            got = d._p_sample_step(mo, x, t, noise, clip)
        want = unfused(d, "_p_sample_step", mo, x, t, noise, clip)
        for k in ("sample", "pred_xstart"):
            close(got[k], want[k], f"{backend} {var} {combo} clip={clip} {k}")


@pytest.mark.parametrize("combo", DTYPE_COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ddim_step_matches_unfused(backend, device, combo):
    mdt, xdt = combo
    require(OP, backend, device, xdt)
    require_model_dtype(backend, mdt)
    d = diffusion("learned", "ddim25")
    mo, x, noise = make(True, mdt, xdt, device=device)
    t = torch.tensor([0, 7, 24], device=device)
    for clip in (False, True):
        for eta in (0.0, 0.5):
            with use_backend(backend):
                got = d._ddim_step(mo, x, t, noise, eta, clip)
            want = unfused(d, "_ddim_step", mo, x, t, noise, eta, clip)
            for k in ("sample", "pred_xstart"):
                close(got[k], want[k], f"{backend} {combo} clip={clip} eta={eta} {k}")
                if backend in ("reference", "cpu"):  # no exp: the same IEEE operations
                    assert torch.equal(got[k], want[k])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_odd_sizes_and_batch1(backend, device):
    """Element counts that do not divide the kernels' blocks, batch 1, 2-D x (no spatial dims)."""
    require(OP, backend, device)
    d = diffusion("learned")
    for shape in ((1, 4, 3, 7), (2, 3, 1000), (1, 4)):
        mo, x, noise = make(True, shape=shape, device=device)
        t = torch.full((shape[0],), 5, device=device)
        with use_backend(backend):
            got = d._p_sample_step(mo, x, t, noise, True)
        want = unfused(d, "_p_sample_step", mo, x, t, noise, True)
        close(got["sample"], want["sample"], str(shape))


# ---- classifier-free guidance combine --------------------------------------------------------

@pytest.mark.parametrize("mdt", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("guide", [3, "all"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_cfg_step_matches_forward_with_cfg(backend, device, guide, mdt):
    """p_sample_step_cfg / ddim_step_cfg on the doubled-batch output == forward_with_cfg's combine
    (as the official code does it) + the unfused step, for the conditional half."""
    require(OP, backend, device)
    d = diffusion("learned")
    mo, x, noise = make(True, mdt, device=device, batch_mult=2)
    t = torch.tensor([0, 7, 24], device=device)
    G = 4 if guide == "all" else guide
    # forward_with_cfg's combine, verbatim (on the full doubled batch), then the first half
    eps, rest = mo[:, :G], mo[:, G:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + 4.0 * (cond_eps - uncond_eps)
    guided = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)[:3]
    with use_backend(backend):
        got = d.p_sample_step_cfg(mo, x, t, noise, 4.0, guide_channels=guide, clip_denoised=True)
        got_ddim = d.ddim_step_cfg(mo, x, t, noise, 4.0, guide_channels=guide, eta=0.3)
    want = unfused(d, "_p_sample_step", guided, x, t, noise, True)
    want_ddim = unfused(d, "_ddim_step", guided, x, t, noise, 0.3, True)
    for k in ("sample", "pred_xstart"):
        close(got[k], want[k], f"ddpm {k}")
        close(got_ddim[k], want_ddim[k], f"ddim {k}")


def test_cfg_step_validation():
    d = diffusion("learned")
    mo, x, noise = make(True, batch_mult=2)
    t = torch.tensor([0, 7, 24])
    with pytest.raises(ValueError, match="doubled batch"):
        d.p_sample_step_cfg(mo[:3], x, t, noise, 4.0)
    with pytest.raises(ValueError, match="guide_channels must be 'all' or an int"):
        d.p_sample_step_cfg(mo, x, t, noise, 4.0, guide_channels=5)


# ---- whole sampling loops on the golden tiny model ---------------------------------------------

@pytest.fixture(scope="module")
def tiny(golden):
    from dit_fast.models import DiT
    record = golden["models"][0]
    model = DiT(**record["config"])
    model.load_state_dict(record["state_dict"], strict=True)
    return model.eval(), record


def test_golden_ddim_sample_through_fused_step(tiny):
    """The golden DDIM step (official code) through the fused path; bitwise equal to unfused."""
    model, record = tiny
    for respacing, ref in record["diffusion"].items():
        d = create_diffusion(timestep_respacing=respacing, learn_sigma=record["config"]["learn_sigma"])
        kw = dict(clip_denoised=False, model_kwargs=dict(y=record["y"]), eta=0)
        with torch.no_grad():
            fused = d.ddim_sample(model, ref["x_t"], ref["t"], **kw)["sample"]
            plain = unfused(d, "ddim_sample", model, ref["x_t"], ref["t"], **kw)["sample"]
        torch.testing.assert_close(fused, ref["ddim_sample"], rtol=1e-5, atol=1e-6)
        assert torch.equal(fused, plain)


def test_p_sample_loop_fused_equals_unfused(tiny):
    model, record = tiny
    cfg = record["config"]
    shape = (2, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    d = create_diffusion("5")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    kw = dict(noise=noise, model_kwargs=dict(y=torch.tensor([1, 3])))
    torch.manual_seed(7)
    fused = d.p_sample_loop(model, shape, **kw)
    torch.manual_seed(7)
    plain = unfused(d, "p_sample_loop", model, shape, **kw)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


# ---- fallbacks -------------------------------------------------------------------------------

def test_unfused_path_when_fusion_does_not_apply():
    d = diffusion("learned")
    mo, x, noise = make(True)
    t = torch.tensor([0, 7, 24])
    calls = []
    fn = lambda p: calls.append(1) or p * 0.5  # noqa: E731
    out = d._p_sample_step(mo, x, t, noise, True, denoised_fn=fn)
    assert calls and torch.isfinite(out["sample"]).all()
    assert not d._fused_step_applies(mo.double(), x, t, noise, None, ddim=False)  # mixed float64
    assert not d._fused_step_applies(mo, x, t, noise.double(), None, ddim=False)
    dx0 = create_diffusion("25", predict_xstart=True)
    assert not dx0._fused_step_applies(mo, x, t, noise, None, ddim=False)
    d1 = create_diffusion("1", learn_sigma=True)
    assert d1.num_timesteps == 1 and not d1._fused_step_applies(mo, x, t[:1], noise, None, ddim=False)


def test_grad_inputs_use_the_differentiable_reference():
    mo, x, noise = make(True)
    coefs = S.ddpm_coefs(1.2, 0.6, 0.3, 0.7, -3.0, -2.0, 1.0).expand(3, 8).contiguous()
    leaf = mo.clone().requires_grad_()
    sample, _ = ddpm_step(leaf, x, noise, coefs)
    sample.sum().backward()
    ref = mo.double().requires_grad_()
    S.ddpm_step_ref(ref, x.double(), noise.double(), coefs.double())[0].sum().backward()
    assert leaf.grad.abs().sum() > 0
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


# ---- the op itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_op_against_reference_without_noise(backend, device):
    require(OP, backend, device)
    mo, x, _ = make(True, device=device)
    g = torch.Generator().manual_seed(3)
    coefs = (torch.rand(3, 8, generator=g) + 0.5).to(device)
    with use_backend(backend):
        for mode in (S.MODE_DDPM_LEARNED_RANGE, S.MODE_DDPM_FIXED, S.MODE_DDIM):
            got = S.sampler_step(mo, x, None, coefs, mode=mode, clip_denoised=False)
            want = S.sampler_step_ref(mo, x, None, coefs, mode, False)
            for a, b in zip(got, want):
                close(a, b, f"mode {mode}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    require(OP, backend, device)
    mo, x, noise = make(True, shape=(2, 4, 3, 3), device=device, batch_mult=2)
    coefs = torch.rand(2, 8, device=device) + 0.5
    m3, x3, n3 = mo.reshape(4, 8, 9), x.reshape(2, 4, 9), noise.reshape(2, 4, 9)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.dit_fast.sampler_step.default,
                              (m3, x3, n3, coefs, 0, True, True, 3.0, 3))
        torch.library.opcheck(torch.ops.dit_fast.sampler_step.default,
                              (m3[:2], x3, None, coefs, 2, False, False, 0.0, 4))


@needs_c
def test_opcheck_native_and_checks():
    mo, x, noise = make(True, shape=(2, 4, 9))
    coefs = torch.rand(2, 8) + 0.5
    torch.library.opcheck(torch.ops.dit_fast.sampler_step_fwd.default,
                          (mo, x, noise, coefs, 0, True, False, 0.0, 0))
    torch.library.opcheck(torch.ops.dit_fast.sampler_step_fwd.default,
                          (mo.double(), x.double(), None, coefs.double(), 1, False, False, 0.0, 0))
    with pytest.raises(RuntimeError, match="coefs must be Float"):
        torch.ops.dit_fast.sampler_step_fwd(mo, x, noise, coefs.double(), 0, True, False, 0.0, 0)
    with pytest.raises(RuntimeError, match="model_out must have batch 4"):
        torch.ops.dit_fast.sampler_step_fwd(mo, x, noise, coefs, 0, True, True, 2.0, 3)
    with pytest.raises(RuntimeError, match="noise must have shape"):
        torch.ops.dit_fast.sampler_step_fwd(mo, x, noise[:1], coefs, 0, True, False, 0.0, 0)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.dit_fast.sampler_step_fwd(mo, x, noise, coefs, 7, True, False, 0.0, 0)


def test_torch_compile_fullgraph():
    mo, x, noise = make(True)
    coefs = torch.rand(3, 8) + 0.5

    def f(mo, x, noise, coefs):
        s, p = ddpm_step(mo, x, noise, coefs)
        return s * 2, p

    got, targets = compile_and_trace(f, mo, x, noise, coefs)
    assert torch.ops.dit_fast.sampler_step.default in targets
    want = S.sampler_step_ref(mo, x, noise, coefs, S.MODE_DDPM_LEARNED_RANGE, True)
    close(got[0], want[0] * 2)
    close(got[1], want[1])


def _bad():
    mo, x, noise = make(True)
    coefs = torch.rand(3, 8)
    return [
        ("x must be a torch.Tensor", (mo, None, noise, coefs), {}),
        ("x must be \\(N, C, ...\\)", (mo, x[0, 0, 0], noise, coefs), {}),
        ("model_output must have shape \\(3, 8", (mo[:, :5], x, noise, coefs), {}),
        ("model_output must have shape \\(6, 8", (mo, x, noise, coefs), {"cfg_scale": 2.0}),
        ("noise must be None or a tensor of x's shape", (mo, x, noise[:1], coefs), {}),
        ("coefs must be a floating-point \\(3, 8\\)", (mo, x, noise, coefs[:, :7]), {}),
        ("guide_channels needs cfg_scale", (mo, x, noise, coefs), {"guide_channels": 3}),
        ("x must be floating point", (mo, x.long(), noise, coefs), {}),
    ]


@pytest.mark.parametrize("match,args,kwargs", match_cases(_bad()))
def test_invalid_inputs(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        ddpm_step(*args, **kwargs)


def test_invalid_mode_and_guide_channels():
    mo, x, noise = make(True, batch_mult=2)
    coefs = torch.rand(3, 8)
    with pytest.raises(ValueError, match="mode must be"):
        S.sampler_step(mo[:3], x, noise, coefs, mode=5)
    with pytest.raises(ValueError, match="guide_channels must be an int in \\[0, 4\\]"):
        ddim_step(mo, x, noise, coefs, cfg_scale=2.0, guide_channels=9)
