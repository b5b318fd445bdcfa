"""dit_fast.ops.patchify: patch_embed (patchify GEMM + bias + pos_embed) and unpatchify, every
available backend against the PyTorch reference.

Ground truth: the reference (conv2d / the official einsum) evaluated in float64 on the same input
values (see dit_fast/tolerances.py). Triton runs under its interpreter on CPU tensors when there is
no GPU (tiny shapes: the interpreter is slow).
"""

import importlib

import pytest
import torch

from dit_fast._backends import use_backend
from dit_fast.ops import patch_embed, patch_embed_ref, unpatchify, unpatchify_ref
from dit_fast.tolerances import assert_close, tol
from op_helpers import (BACKEND_DEVICES, HAS_C, assert_auto_picks_no_interpreter,
                        assert_thread_count_independent, compile_and_trace,
                        each_backend_dtype_shape, each_cpu_isa, interpreted, match_cases, needs_c,
                        require, shape_id)

P = importlib.import_module("dit_fast.ops.patchify")
OP, OP_U = P.OP_PATCH_EMBED, P.OP_UNPATCHIFY

# (N, C, H, W, p, D): hidden 72 / 1000 / 1152, batch 1, non-square grid, token counts that do not
# divide the 64-row tiles, p = 1 / 2 / 4.
SHAPES = [(1, 4, 4, 4, 2, 72), (2, 3, 6, 10, 2, 72), (3, 4, 8, 8, 2, 1000), (1, 4, 8, 8, 4, 1152),
          (2, 2, 3, 5, 1, 72)]
SMALL = [(1, 4, 4, 4, 2, 72), (2, 3, 6, 10, 2, 72), (1, 4, 8, 8, 4, 1152)]


def make_inputs(N, C, H, W, p, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(D, C, p, p, generator=g) / (C * p * p) ** 0.5
    b = 0.5 * torch.randn(D, generator=g)
    pos = torch.randn(1, (H // p) * (W // p), D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, pos)]


def truth(x, w, b, pos, p):
    return patch_embed_ref(x.double(), w.double(), None if b is None else b.double(),
                           None if pos is None else pos.double(), p)


# ---- patch_embed forward ----------------------------------------------------------------------

@each_backend_dtype_shape(SHAPES)
def test_forward_matches_reference(backend, device, dtype, shape):
    require(OP, backend, device, dtype)
    if interpreted(backend, device) and shape not in SMALL:
        pytest.skip("Triton interpreter: small shapes only")
    x, w, b, pos = make_inputs(*shape, dtype=dtype, device=device)
    p = shape[4]
    with use_backend(backend):
        out = patch_embed(x, w, b, pos, p)
    N, C, H, W, _, D = shape
    assert out.shape == (N, (H // p) * (W // p), D) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, truth(x, w, b, pos, p), msg=f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_optional_bias_and_pos(backend, device):
    require(OP, backend, device)
    x, w, b, pos = make_inputs(2, 3, 6, 10, 2, 72, device=device)
    with use_backend(backend):
        for bb, pp in ((None, pos), (b, None), (None, None), (b, pos[0])):
            assert_close(patch_embed(x, w, bb, pp, 2), truth(x, w, bb, pp, 2))


def test_matches_the_model_patch_embed():
    """Drop-in for DiT's `x_embedder(x) + pos_embed`."""
    from dit_fast.models import DiT
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=1, num_heads=2,
                num_classes=10).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = model.x_embedder(x) + model.pos_embed
        got = patch_embed(x, model.x_embedder.proj.weight, model.x_embedder.proj.bias,
                          model.pos_embed, model.patch_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- patch_embed backward ---------------------------------------------------------------------

GRAD_SHAPES = [(1, 4, 4, 4, 2, 72), (2, 3, 6, 10, 2, 1000), (1, 4, 8, 8, 4, 1152)]


@each_backend_dtype_shape(GRAD_SHAPES, [torch.float32, torch.bfloat16])
def test_backward_matches_reference_autograd(backend, device, dtype, shape):
    require(OP, backend, device, dtype)
    if interpreted(backend, device) and shape != GRAD_SHAPES[0]:
        pytest.skip("Triton interpreter: small shapes only")
    x, w, b, pos = make_inputs(*shape, dtype=dtype, device=device)
    p = shape[4]
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with use_backend(backend):
        out = patch_embed(*leaves, pos, p)
        dy = torch.randn_like(out)
        out.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    truth(*ref, pos, p).backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias"), leaves, ref):
        assert got.grad.dtype == dtype
        # dweight / dbias are sums over N*T tokens: scale the tolerance with the sum's size
        scale = 1.0 if name == "dx" else max(1.0, (shape[0] * (shape[2] // p) * (shape[3] // p)) ** 0.5 / 4)
        torch.testing.assert_close(got.grad.double(), want.grad, **{
            k: v * scale for k, v in tol(dtype, "grad").items()},
            msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_backward_partial_and_pos_grad(backend, device):
    """Only the needed gradients are computed; pos_embed gets one only if it requires grad."""
    require(OP, backend, device)
    x, w, b, pos = make_inputs(2, 3, 6, 10, 2, 72, device=device)
    w.requires_grad_()
    pos.requires_grad_()
    with use_backend(backend):
        out = patch_embed(x, w, b, pos, 2)
        dy = torch.randn_like(out)
        out.backward(dy)
    assert x.grad is None and b.grad is None
    assert_close(pos.grad, dy.double().sum(0, keepdim=True), kind="grad")
    wr = w.detach().double().requires_grad_()
    truth(x, wr, b, pos.detach(), 2).backward(dy.double())
    assert_close(w.grad, wr.grad, kind="grad")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    require(OP, backend, "cpu", torch.float64)
    x, w, b, pos = make_inputs(2, 2, 4, 6, 2, 8, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b, pos)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: patch_embed(*a, 2), args)


# ---- CPU kernel specifics ---------------------------------------------------------------------


@needs_c
def test_cpu_float64_and_isa_paths():
    x, w, b, pos = make_inputs(3, 4, 8, 8, 2, 1000, dtype=torch.float64)
    exact = truth(x, w, b, pos, 2)
    dy = torch.randn(exact.shape, dtype=torch.float64)
    with each_cpu_isa() as isas:
        for isa in isas:
            for dt in (torch.float64, torch.float32, torch.bfloat16):
                args = [t.to(dt) for t in (x, w, b, pos)]
                out = torch.ops.dit_fast.patch_embed_fwd(*args[:3], args[3][0], 2)
                assert_close(out, truth(*args, 2), msg=f"{isa} {dt}")
                dyt = dy.to(dt)
                dx, dw, db = torch.ops.dit_fast.patch_embed_bwd(dyt, args[0], args[1], 2,
                                                                True, True, True)
                rdx, rdw, rdb = P._bwd_reference(dyt.double(), *[a.double() for a in args[:2]], 2,
                                                 True, True, True)
                for a, r in ((dx, rdx), (dw, rdw), (db, rdb)):
                    torch.testing.assert_close(a.double(), r, **tol(dt, "grad"),
                                               msg=lambda m: f"{isa} {dt}: {m}")


@needs_c
def test_cpu_results_independent_of_thread_count():
    x, w, b, pos = make_inputs(3, 4, 8, 8, 2, 1000)
    dy = torch.randn(3, 16, 1000)
    assert_thread_count_independent(lambda: (
        torch.ops.dit_fast.patch_embed_fwd(x, w, b, pos[0], 2),
        *torch.ops.dit_fast.patch_embed_bwd(dy, x, w, 2, True, True, True)))


@needs_c
def test_cpu_unneeded_gradients_are_empty():
    x, w, b, pos = make_inputs(1, 4, 4, 4, 2, 72)
    dx, dw, db = torch.ops.dit_fast.patch_embed_bwd(torch.randn(1, 4, 72), x, w, 2, False, True, False)
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape


def test_empty_batch():
    x, w, b, pos = make_inputs(1, 4, 4, 4, 2, 72)
    for backend in ("reference", "cpu") if HAS_C else ("reference",):
        with use_backend(backend):
            xe = x[:0].clone().requires_grad_()
            out = patch_embed(xe, w.clone().requires_grad_(), b, pos, 2)
            assert out.shape == (0, 4, 72)
            out.sum().backward()
            assert xe.grad.shape == xe.shape


# ---- unpatchify -------------------------------------------------------------------------------

UNP_CASES = [(1, 4, 2, 8), (2, 9, 2, 4), (3, 16, 4, 3), (2, 4, 8, 8)]  # (N, T, p, C)


@pytest.mark.parametrize("case", UNP_CASES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_unpatchify_exact(backend, device, dtype, case):
    require(OP_U, backend, device, dtype)
    N, T, p, C = case
    y = torch.randn(N, T, p * p * C).to(device=device, dtype=dtype)
    with use_backend(backend):
        img = unpatchify(y, p, C)
        assert torch.equal(img, unpatchify_ref(y, p, C))
        yg = y.detach().clone().requires_grad_()
        out = unpatchify(yg, p, C)
        dimg = torch.randn_like(out)
        out.backward(dimg)
    yr = y.detach().clone().requires_grad_()
    unpatchify_ref(yr, p, C).backward(dimg)
    assert torch.equal(yg.grad, yr.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_unpatchify_non_square_grid(backend, device):
    require(OP_U, backend, device)
    y = torch.randn(2, 6, 2 * 2 * 3, device=device)
    with use_backend(backend):
        img = unpatchify(y, 2, 3, grid=(2, 3))
    expected = torch.einsum("nhwpqc->nchpwq", y.reshape(2, 2, 3, 2, 2, 3)).reshape(2, 3, 4, 6)
    assert torch.equal(img, expected)
    # patchify's inverse: the image's patch embedding grid
    assert img.shape == (2, 3, 4, 6)


def test_unpatchify_matches_model():
    from dit_fast.models import DiT
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=1, num_heads=2,
                num_classes=10)
    y = torch.randn(2, 16, 2 * 2 * 8)
    assert torch.equal(unpatchify(y, model.patch_size, model.out_channels), model.unpatchify(y))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unpatchify_gradcheck(backend):
    require(OP_U, backend, "cpu", torch.float64)
    y = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: unpatchify(t, 2, 2), (y,))


# ---- torch.library / torch.compile ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck_custom_ops(backend, device):
    require(OP, backend, device)
    x, w, b, pos = make_inputs(1, 4, 4, 4, 2, 72, device=device)
    with use_backend(backend):
        for rg in (False, True):
            args = [t.detach().clone().requires_grad_(rg) for t in (x, w, b)]
            torch.library.opcheck(torch.ops.dit_fast.patch_embed.default, (*args, pos[0], 2))
        dy = torch.randn(1, 4, 72, device=device)
        torch.library.opcheck(torch.ops.dit_fast.patch_embed_backward.default,
                              (dy, x, w, 2, True, True, True))
        y = torch.randn(2, 4, 2 * 2 * 3, device=device)
        for rg in (False, True):
            torch.library.opcheck(torch.ops.dit_fast.unpatchify.default,
                                  (y.clone().requires_grad_(rg), 2, 3, 2, 2))
        torch.library.opcheck(torch.ops.dit_fast.unpatchify_backward.default,
                              (torch.randn(2, 3, 4, 4, device=device), 2))


@needs_c
def test_opcheck_native_ops():
    for dt in (torch.float32, torch.bfloat16):
        x, w, b, pos = make_inputs(1, 4, 4, 4, 2, 72, dtype=dt)
        torch.library.opcheck(torch.ops.dit_fast.patch_embed_fwd.default, (x, w, b, pos[0], 2))
    torch.library.opcheck(torch.ops.dit_fast.patch_embed_fwd.default, (x, w, None, None, 2))
    torch.library.opcheck(torch.ops.dit_fast.patch_embed_bwd.default,
                          (torch.randn(1, 4, 72, dtype=x.dtype), x, w, 2, True, False, True))
    y = torch.randn(2, 4, 12)
    torch.library.opcheck(torch.ops.dit_fast.unpatchify_fwd.default, (y, 2, 3, 2, 2))
    torch.library.opcheck(torch.ops.dit_fast.unpatchify_bwd.default, (torch.randn(2, 3, 4, 4), 2))


def test_torch_compile_fullgraph():
    def f(x, w, b, pos):
        return unpatchify(patch_embed(x, w, b, pos, 2)[..., :8] * 2, 2, 2)

    x, w, b, pos = make_inputs(2, 4, 4, 4, 2, 72)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    out, targets = compile_and_trace(f, *leaves, pos)
    assert torch.ops.dit_fast.patch_embed.default in targets
    assert torch.ops.dit_fast.unpatchify.default in targets
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    expected = unpatchify_ref(truth(*ref_leaves, pos, 2)[..., :8] * 2, 2, 2)
    assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, kind="grad")


# ---- validation -------------------------------------------------------------------------------

def _bad_patch_embed():
    x, w, b, pos = make_inputs(2, 4, 4, 4, 2, 8)
    return [
        ("x must be 4-D", (x[0], w, b, pos, 2)),
        ("x must be a floating-point", (x.long(), w.long(), b.long(), pos.long(), 2)),
        ("patch_size must be a positive int", (x, w, b, pos, 0)),
        ("patch_size must be a positive int", (x, w, b, pos, 2.0)),
        ("divisible by patch_size", (x[..., :3], w, b, pos, 2)),
        ("weight must have shape", (x, w[:, :2], b, pos, 2)),
        ("weight must have the same dtype", (x, w.double(), b, pos, 2)),
        ("bias must have shape", (x, w, b[:3], pos, 2)),
        ("bias must be a torch.Tensor", (x, w, 1.0, pos, 2)),
        ("pos_embed must have shape", (x, w, b, pos[:, :3], 2)),
        ("pos_embed must be on the same device", (x, w, b, pos.to("meta"), 2)),
    ]


@pytest.mark.parametrize("match,args", match_cases(_bad_patch_embed()))
def test_patch_embed_invalid_inputs(match, args):
    with pytest.raises(ValueError, match=match):
        patch_embed(*args)


@pytest.mark.parametrize("match,args,kwargs", [
    ("x must be 3-D", (torch.randn(4, 12), 2, 3), {}),
    ("patch_size must be a positive int", (torch.randn(1, 4, 12), -1, 3), {}),
    ("out_channels must be a positive int", (torch.randn(1, 4, 12), 2, 0), {}),
    ("last dimension must be", (torch.randn(1, 4, 12), 2, 4), {}),
    ("not a square grid", (torch.randn(1, 6, 12), 2, 3), {}),
    ("grid .* has 4 cells", (torch.randn(1, 6, 12), 2, 3), {"grid": (2, 2)}),
    ("grid must be a pair", (torch.randn(1, 6, 12), 2, 3), {"grid": 6}),
])
def test_unpatchify_invalid_inputs(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        unpatchify(*args, **kwargs)


def test_auto_never_picks_triton_for_cpu_tensors():
    assert_auto_picks_no_interpreter(OP, torch.empty(0))


# ---- Triton AOT specializations (compiled for sm_80 / sm_90 by tests/test_triton_aot.py) ------

@pytest.mark.parametrize("module", ["patchify", "adaln", "sampler_step"])
def test_triton_aot_specs_are_well_formed(module):
    pytest.importorskip("triton")
    mod = importlib.import_module(f"dit_fast.kernels.triton.{module}")
    assert mod.AOT_SPECS
    dtypes = set()
    for kernel, signature, constexprs in mod.AOT_SPECS:
        names = list(kernel.arg_names)
        assert list(signature) == names, (kernel, signature)
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)
        dtypes |= {v for v in signature.values() if v.startswith("*")}
    assert {"*fp32", "*bf16"} <= dtypes  # representative fp32 and bf16 specializations
