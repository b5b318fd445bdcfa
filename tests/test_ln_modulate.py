"""dit_fast.ops.ln_modulate: every available backend against the PyTorch reference.

Ground truth is `ln_modulate_ref` evaluated in float64 on the same input values (see
dit_fast/tolerances.py). Backends that cannot run here are skipped with the registry's reason.
"""

import importlib

import pytest
import torch

from dit_fast import _backends
from dit_fast._backends import use_backend
from dit_fast.ops import ln_modulate, ln_modulate_ref
from dit_fast.tolerances import assert_close
from error_rule import error_floor
from op_helpers import (BACKEND_DEVICES, HAS_C, assert_thread_count_independent, backend_devices,
                        compile_and_trace, each_backend_dtype_shape, each_cpu_isa, empty_row_inputs,
                        match_cases, needs_c, require, shape_for)

L = importlib.import_module("dit_fast.ops.ln_modulate")  # the module (the package re-exports the function)
OP = L.OP_NAME

SHAPES = [(1, 1, 72), (3, 7, 72), (1, 257, 72), (3, 1, 1000), (1, 7, 1000), (3, 257, 1152),
          (1, 7, 1152)]
GRAD_SHAPES = [(1, 1, 72), (3, 7, 72), (3, 7, 1000), (1, 257, 1152)]
# The interpreter is slow: same D, fewer rows.
SMALL = {(3, 257, 1152): (1, 9, 1152), (1, 257, 1152): (1, 9, 1152)}


def make_inputs(N, T, D, dtype=torch.float32, device="cpu", strided=False, seed=0):
    """x with a per-row offset and spread (LayerNorm must remove both); shift/scale either
    contiguous or, with strided=True, chunks of an (N, 6D) tensor like DiT's adaLN output."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(N, T, 1, generator=g) + torch.randn(N, T, D, generator=g) * torch.randn(
        N, T, 1, generator=g).exp()
    x = x.to(device=device, dtype=dtype)
    if strided:
        mod = (0.5 * torch.randn(N, 6 * D, generator=g)).to(device=device, dtype=dtype)
        shift, scale = mod[:, 2 * D:3 * D], mod[:, 4 * D:5 * D]
    else:
        shift = (0.5 * torch.randn(N, D, generator=g)).to(device=device, dtype=dtype)
        scale = (0.5 * torch.randn(N, D, generator=g)).to(device=device, dtype=dtype)
    return x, shift, scale


def truth(x, shift, scale, eps=1e-6):
    return ln_modulate_ref(x.double(), shift.double(), scale.double(), eps)


# ---- forward --------------------------------------------------------------------------------

@each_backend_dtype_shape(SHAPES)
def test_forward_matches_reference(backend, device, dtype, shape):
    require(OP, backend, device, dtype)
    shape = shape_for(backend, device, shape, SMALL)
    x, shift, scale = make_inputs(*shape, dtype=dtype, device=device)
    with use_backend(backend):
        y = ln_modulate(x, shift, scale)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_close(y, truth(x, shift, scale), msg=f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_strided_and_expanded_shift_scale(backend, device):
    require(OP, backend, device)
    x, shift, scale = make_inputs(3, 7, 72, device=device, strided=True)
    assert not shift.is_contiguous() and shift.stride() == (6 * 72, 1)
    with use_backend(backend):
        y = ln_modulate(x, shift, scale)
        assert_close(y, truth(x, shift, scale))
        # stride-0 rows (one conditioning vector broadcast over the batch)
        sh1, sc1 = shift[:1].expand(3, 72), scale[:1].expand(3, 72)
        assert_close(ln_modulate(x, sh1, sc1), truth(x, sh1, sc1))
        # non-unit stride along D (needs a copy inside, still correct)
        sh2 = torch.randn(3, 144, device=device)[:, ::2]
        assert_close(ln_modulate(x, sh2, scale), truth(x, sh2, scale))
        # non-contiguous x
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not xt.is_contiguous()
        assert_close(ln_modulate(xt, shift, scale), truth(x, shift, scale))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_eps_and_constant_rows(backend, device):
    require(OP, backend, device)
    x, shift, scale = make_inputs(2, 3, 72, device=device)
    x[0, 1] = 5.0  # zero-variance row: y must equal shift exactly-ish
    with use_backend(backend):
        for eps in (1e-6, 1e-2):
            assert_close(ln_modulate(x, shift, scale, eps=eps), truth(x, shift, scale, eps))
        y = ln_modulate(x, shift, scale)
    assert_close(y[0, 1], shift[0].double())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_inputs(backend, device):
    require(OP, backend, device)
    with use_backend(backend):
        for N, T, (x,), (shift, scale) in empty_row_inputs(device, 1, 2):
            y = ln_modulate(x, shift, scale)
            assert y.shape == (N, T, 16)
            y.sum().backward()
            assert torch.equal(shift.grad, torch.zeros_like(shift))
            assert torch.equal(scale.grad, torch.zeros_like(scale))


@needs_c
def test_cpu_bf16_at_least_as_accurate_as_eager_bf16():
    x, shift, scale = make_inputs(3, 257, 1152, dtype=torch.bfloat16)
    exact = truth(x, shift, scale)
    with use_backend("cpu"):
        err_ours = (ln_modulate(x, shift, scale).double() - exact).abs().max()
    err_eager = (ln_modulate_ref(x, shift, scale).double() - exact).abs().max()
    # c = 0.5: one correct rounding to bf16 of an fp32-accurate result, whatever eager's error
    assert err_ours <= err_eager + error_floor(exact.abs().max().item(), torch.bfloat16, 1152, 0.5)


# ---- backward -------------------------------------------------------------------------------

@each_backend_dtype_shape(GRAD_SHAPES)
def test_gradients_match_reference(backend, device, dtype, shape):
    require(OP, backend, device, dtype)
    shape = shape_for(backend, device, shape, SMALL)
    x, shift, scale = (t.requires_grad_() for t in make_inputs(*shape, dtype=dtype, device=device))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    with use_backend(backend):
        ln_modulate(x, shift, scale).backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ln_modulate_ref(*ref, 1e-6).backward(dy.double())
    for name, got, want in zip(("dx", "dshift", "dscale"), (x, shift, scale), ref):
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad, kind="grad", msg=f"{name} {backend} {dtype} {shape}")


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradcheck_float64(backend, device):
    require(OP, backend, device, torch.float64)
    x, shift, scale = (t.requires_grad_() for t in
                       make_inputs(2, 3, 16, dtype=torch.float64, device=device, strided=True))
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: ln_modulate(a, b, c), (x, shift, scale))


@needs_c
def test_backends_can_be_mixed_between_forward_and_backward():
    x, shift, scale = (t.requires_grad_() for t in make_inputs(3, 7, 72))
    with use_backend("reference"):
        y = ln_modulate(x, shift, scale)
    with use_backend("cpu"):
        y.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ln_modulate_ref(*ref).sum().backward()
    for got, want in zip((x, shift, scale), ref):
        assert_close(got.grad, want.grad, kind="grad")


# ---- torch.library / torch.compile ----------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_devices(slow=("reference",)))
def test_opcheck_custom_op(backend, device):
    require(OP, backend, device)
    x, shift, scale = make_inputs(2, 5, 72, device=device)
    with use_backend(backend):
        for rg in (False, True):
            args = [t.detach().clone().requires_grad_(rg) for t in (x, shift, scale)]
            torch.library.opcheck(torch.ops.dit_fast.ln_modulate.default, (*args, 1e-6))
        mean, rstd = L._forward(x, shift, scale, 1e-6)[1:]
        dy = torch.randn_like(x)
        torch.library.opcheck(torch.ops.dit_fast.ln_modulate_backward.default,
                              (dy, x, scale, mean, rstd))


@needs_c
def test_opcheck_native_ops():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, shift, scale = make_inputs(2, 5, 72, dtype=dtype, strided=True)
        torch.library.opcheck(torch.ops.dit_fast.ln_modulate_fwd.default, (x, shift, scale, 1e-6))
        _, mean, rstd = torch.ops.dit_fast.ln_modulate_fwd(x, shift, scale, 1e-6)
        assert mean.dtype == rstd.dtype == L._stats_dtype(dtype) and mean.shape == (2, 5)
        torch.library.opcheck(torch.ops.dit_fast.ln_modulate_bwd.default,
                              (torch.randn_like(x), x, scale, mean, rstd))


def test_torch_compile_fullgraph():
    """One opaque node in a graph-break-free trace; forward and backward match eager."""
    x, shift, scale = (t.requires_grad_() for t in make_inputs(2, 5, 72))
    y, targets = compile_and_trace(lambda a, b, c: ln_modulate(a, b, c) * 2 + 1, x, shift, scale)
    assert torch.ops.dit_fast.ln_modulate.default in targets
    assert_close(y, 2 * truth(x, shift, scale) + 1)
    y.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    (2 * ln_modulate_ref(*ref) + 1).sum().backward()
    for got, want in zip((x, shift, scale), ref):
        assert_close(got.grad, want.grad, kind="grad")


@pytest.mark.slow
def test_torch_compile_inductor_forward():
    x, shift, scale = make_inputs(2, 5, 72)
    compiled = torch.compile(lambda a, b, c: ln_modulate(a, b, c) + 1, fullgraph=True)
    assert_close(compiled(x, shift, scale), truth(x, shift, scale) + 1)


# ---- validation and backend errors ----------------------------------------------------------

def _bad_inputs():
    x, sh, sc = make_inputs(2, 3, 8)
    return [
        ("x must be 3-D", (x[0], sh, sc), {}),
        ("x must be a floating-point", (x.long(), sh.long(), sc.long()), {}),
        ("shift must have shape", (x, sh[:1], sc), {}),
        ("scale must have shape", (x, sh, sc[:, :4]), {}),
        ("scale must have shape", (x, sh, sc[None]), {}),
        ("shift must have the same dtype", (x, sh.double(), sc), {}),
        ("scale must be on the same device", (x, sh, sc.to("meta")), {}),
        ("eps must be >= 0", (x, sh, sc), {"eps": -1.0}),
        ("shift must be a torch.Tensor", (x, 0.5, sc), {}),
    ]


@pytest.mark.parametrize("match,args,kwargs", match_cases(_bad_inputs()))
def test_invalid_inputs_raise_value_error(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        ln_modulate(*args, **kwargs)


def test_forced_backend_that_cannot_run_raises():
    x, shift, scale = make_inputs(2, 3, 8)
    with use_backend("triton"), pytest.raises(
            RuntimeError, match="does not support torch.float64|runs on cuda tensors"):
        ln_modulate(*(t.double() for t in (x, shift, scale)))
    with use_backend("cuda"), pytest.raises(RuntimeError, match="runs on cuda tensors"):
        ln_modulate(x, shift, scale)
    if HAS_C:
        with use_backend("cpu"), pytest.raises(RuntimeError, match="does not support torch.float16"):
            ln_modulate(*(t.half() for t in (x, shift, scale)))


def test_forced_backend_error_also_raised_with_grad_and_from_env(monkeypatch):
    x, shift, scale = (t.requires_grad_() for t in make_inputs(2, 3, 8))
    monkeypatch.setenv("DIT_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="DIT_FAST_BACKEND=cuda"):
        ln_modulate(x, shift, scale)


def test_missing_extension_reported_and_auto_falls_back(monkeypatch):
    """Simulates a machine where dit_fast._C was not built."""
    monkeypatch.setitem(_backends._probe_cache, "cpu", "dit_fast._C not built: simulated")
    monkeypatch.setattr(_backends, "_decisions", {})
    x, shift, scale = make_inputs(2, 3, 72)
    with use_backend("cpu"), pytest.raises(RuntimeError, match="dit_fast._C not built: simulated"):
        ln_modulate(x, shift, scale)
    assert _backends.select(OP, x) == "reference"
    assert_close(ln_modulate(x, shift, scale), truth(x, shift, scale))


# ---- CPU-kernel specifics -------------------------------------------------------------------


@needs_c
def test_auto_uses_cpu_kernel_for_supported_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert _backends.select(OP, torch.empty(0, dtype=dtype)) == "cpu"
    assert _backends.select(OP, torch.empty(0, dtype=torch.float16)) == "reference"


@needs_c
def test_every_cpu_isa_path():
    from dit_fast import _C
    assert "generic" in _C.supported_cpu_isas()
    x, shift, scale = make_inputs(3, 33, 1000, dtype=torch.bfloat16, strided=True)
    dy = torch.randn_like(x)
    exact = truth(x, shift, scale)
    with each_cpu_isa() as isas:
        for isa in isas:
            with use_backend("cpu"):
                assert_close(ln_modulate(x, shift, scale), exact, msg=isa)
                y, mean, rstd = L._forward(x, shift, scale, 1e-6)
                dx, dsh, dsc = L._BWD["cpu"](dy, x, scale, mean, rstd)
            rdx, rdsh, rdsc = L._bwd_reference(dy, x, scale, mean, rstd)
            for a, b in ((dx, rdx), (dsh, rdsh), (dsc, rdsc)):
                assert_close(a, b.double(), kind="grad", msg=isa)
        with pytest.raises(ValueError, match="unknown CPU ISA"):
            _C.set_cpu_isa("sse9")


@needs_c
@pytest.mark.parametrize("shape", [(1, 257, 72), (70, 3, 40)], ids=["chunked", "per-batch"])
def test_cpu_results_independent_of_thread_count(shape):
    x, shift, scale = make_inputs(*shape)
    dy = torch.randn_like(x)

    def run():
        y, mean, rstd = torch.ops.dit_fast.ln_modulate_fwd(x, shift, scale, 1e-6)
        return y, mean, rstd, *torch.ops.dit_fast.ln_modulate_bwd(dy, x, scale, mean, rstd)

    assert_thread_count_independent(run)


@needs_c
def test_eager_fast_path_matches_custom_op_path():
    x, shift, scale = make_inputs(3, 7, 72, strided=True)
    with use_backend("cpu"):
        fast = ln_modulate(x, shift, scale)
        via_op = torch.ops.dit_fast.ln_modulate(x, shift, scale, 1e-6)[0]
    assert torch.equal(fast, via_op)


@needs_c
@pytest.mark.parametrize("match,fn", [
    ("x must be contiguous",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(x.transpose(1, 2), sh, sc, 1e-6)),
    ("x must be a 3-D",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(x[0], sh, sc, 1e-6)),
    ("shift must have the same dtype",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(x, sh.double(), sc, 1e-6)),
    ("scale must have shape",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(x, sh, sc[:1], 1e-6)),
    ("scale must have unit stride",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(
         x, sh, torch.randn(2, 16)[:, ::2], 1e-6)),
    ("unsupported dtype",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(x.half(), sh.half(), sc.half(), 1e-6)),
    ("eps must be >= 0",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_fwd(x, sh, sc, -1.0)),
    ("dy must have shape",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_bwd(
         x[:, :1], x, sc, torch.zeros(2, 3), torch.ones(2, 3))),
    ("mean must have dtype",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_bwd(
         x, x, sc, torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3))),
    ("rstd must have shape",
     lambda x, sh, sc: torch.ops.dit_fast.ln_modulate_bwd(
         x, x, sc, torch.zeros(2, 3), torch.ones(2, 4))),
])
def test_native_op_checks_name_the_argument(match, fn):
    x, shift, scale = make_inputs(2, 3, 8)
    with pytest.raises(RuntimeError, match=match):
        fn(x, shift, scale)
