"""dit_fast.ops.gated_residual: gated_residual_ln_modulate and gated_residual, every available
backend against the PyTorch reference.

Ground truth is the reference evaluated in float64 on the same input values (dit_fast/tolerances.py).
For reduced-precision storage the op's LayerNorm sees x_new as stored (rounded), so h is compared
with the float64 reference LayerNorm-modulate of the returned x_new (and x_new with the exact
x + gate * y). The Triton backend runs under Triton's interpreter on CPU tensors when there is no
GPU (TRITON_INTERPRET=1, set by conftest.py), with smaller shapes (the interpreter is slow).
Backends that cannot run here are skipped with the registry's reason.
"""

import importlib

import pytest
import torch

from dit_fast._backends import use_backend
from dit_fast.ops import (gated_residual, gated_residual_ln_modulate,
                          gated_residual_ln_modulate_ref, gated_residual_ref, ln_modulate_ref)
from dit_fast.tolerances import assert_close
from op_helpers import (ALL_OPCHECK, BACKEND_DEVICES, FULL_OPCHECK_BACKEND, QUICK_OPCHECK,
                        assert_auto_picks_no_interpreter, assert_thread_count_independent,
                        backend_devices, compile_and_trace, each_backend_dtype_shape, each_cpu_isa,
                        empty_row_inputs, match_cases, needs_c, opcheck_utils, require, shape_for)

G = importlib.import_module("dit_fast.ops.gated_residual")
OP, OP_PLAIN = G.OP_NAME, G.OP_NAME_PLAIN

SHAPES = [(1, 1, 72), (3, 7, 72), (1, 257, 72), (3, 1, 1000), (1, 7, 1152), (3, 65, 1152)]
GRAD_SHAPES = [(1, 1, 72), (1, 257, 72), (3, 7, 1000), (2, 33, 1152)]
# Under the interpreter: every odd size appears, but fewer rows.
SMALL = {(3, 65, 1152): (1, 9, 1152), (2, 33, 1152): (1, 9, 1152)}


def make_inputs(N, T, D, dtype=torch.float32, device="cpu", strided=False, seed=0):
    """x with a per-row offset and spread, y ~ N(0, 1); gate/shift/scale contiguous or (strided=True)
    chunks of an (N, 6D) tensor like DiT's adaLN output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, 1, generator=g) + torch.randn(N, T, D, generator=g) * torch.randn(
        N, T, 1, generator=g).mul(0.5).exp()
    y = torch.randn(N, T, D, generator=g)
    if strided:
        mod = 0.5 * torch.randn(N, 6 * D, generator=g)
        gate, shift, scale = mod[:, 2 * D:3 * D], mod[:, 3 * D:4 * D], mod[:, 5 * D:]
    else:
        gate, shift, scale = (0.5 * torch.randn(N, D, generator=g) for _ in range(3))
    return tuple(t.to(device=device, dtype=dtype) for t in (x, y, gate, shift, scale))


def check_forward(x_new, h, x, y, gate, shift, scale, eps=1e-6, msg=""):
    exact_xn = gated_residual_ref(x.double(), y.double(), gate.double())
    assert_close(x_new, exact_xn, msg=f"x_new {msg}")
    assert_close(h, ln_modulate_ref(x_new.double(), shift.double(), scale.double(), eps),
                 msg=f"h {msg}")
    if x.dtype in (torch.float32, torch.float64):  # no rounding of x_new to speak of
        assert_close(h, gated_residual_ln_modulate_ref(*(t.double() for t in (x, y, gate, shift,
                                                                              scale)), eps)[1])


# ---- forward --------------------------------------------------------------------------------

@each_backend_dtype_shape(SHAPES)
def test_forward_matches_reference(backend, device, dtype, shape):
    require(OP, backend, device, dtype, fp16_reference=False)
    shape = shape_for(backend, device, shape, SMALL)
    x, y, gate, shift, scale = make_inputs(*shape, dtype=dtype, device=device, strided=True)
    with use_backend(backend):
        x_new, h = gated_residual_ln_modulate(x, y, gate, shift, scale)
        out = gated_residual(x, y, gate)
    for t in (x_new, h, out):
        assert t.shape == x.shape and t.dtype == dtype and t.device == x.device
    check_forward(x_new, h, x, y, gate, shift, scale, msg=f"{backend} {dtype} {shape}")
    assert torch.equal(out, x_new), "gated_residual and the fused op's x_new must agree bitwise"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_broadcast_noncontiguous_and_eps(backend, device):
    require(OP, backend, device)
    x, y, gate, shift, scale = make_inputs(3, 5, 72, device=device, strided=True)
    with use_backend(backend):
        # stride-0 rows (one conditioning vector for the whole batch), non-unit stride along D
        g1 = gate[:1].expand(3, 72)
        sc2 = torch.randn(3, 144, device=device)[:, ::2]
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        x_new, h = gated_residual_ln_modulate(xt, y, g1, shift, sc2, eps=1e-2)
        check_forward(x_new, h, x, y, g1, shift, sc2, eps=1e-2)
        assert_close(gated_residual(xt, y, g1), gated_residual_ref(x, y, g1).double())
        # a zero-variance x_new row: h == shift
        y0 = y.clone()
        y0[1, 2] = 0.0
        x0 = x.clone()
        x0[1, 2] = 4.0
        _, h0 = gated_residual_ln_modulate(x0, y0, gate, shift, scale)
        assert_close(h0[1, 2], shift[1].double())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_inputs(backend, device):
    require(OP, backend, device)
    with use_backend(backend):
        for N, T, (x, y), (gate, shift, scale) in empty_row_inputs(device, 2, 3):
            x_new, h = gated_residual_ln_modulate(x, y, gate, shift, scale)
            out = gated_residual(x, y, gate)
            assert x_new.shape == h.shape == out.shape == (N, T, 16)
            (x_new.sum() + h.sum() + out.sum()).backward()
            for p in (gate, shift, scale):
                assert torch.equal(p.grad, torch.zeros_like(p))


# ---- backward -------------------------------------------------------------------------------

def _reference_grads(x, y, gate, shift, scale, dxn, dh, dout, stored_x_new=None, eps=1e-6):
    """float64 reference gradients. With `stored_x_new` (the op's rounded x_new) the reference
    LayerNorm is evaluated at the stored value while gradients pass straight through the
    rounding: the op's documented semantics for reduced-precision storage."""
    ref = [t.detach().double().requires_grad_() for t in (x, y, gate, shift, scale)]
    x_new = gated_residual_ref(*ref[:3])
    if stored_x_new is not None:
        x_new = x_new + (stored_x_new.detach().double() - x_new).detach()
    h = ln_modulate_ref(x_new, ref[3], ref[4], eps)
    loss = (h * dh.double()).sum()
    if dxn is not None:
        loss = loss + (x_new * dxn.double()).sum()
    if dout is not None:
        loss = loss + (gated_residual_ref(*ref[:3]) * dout.double()).sum()
    loss.backward()
    return [t.grad for t in ref]


NAMES = ("dx", "dy", "dgate", "dshift", "dscale")


@each_backend_dtype_shape(GRAD_SHAPES)
def test_gradients_match_reference(backend, device, dtype, shape):
    """Both outputs of the fused op used (x_new feeds the output and h, so dx collects both
    paths); then the plain op on its own (separate backward passes, so no reduced-precision
    accumulation of two ops' gradients blurs the comparison)."""
    require(OP, backend, device, dtype, fp16_reference=False)
    shape = shape_for(backend, device, shape, SMALL)
    g = torch.Generator().manual_seed(1)
    dxn, dh, dout = (torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                     for _ in range(3))
    inputs = [t.requires_grad_() for t in make_inputs(*shape, dtype=dtype, device=device)]
    with use_backend(backend):
        x_new, h = gated_residual_ln_modulate(*inputs)
        torch.autograd.backward([x_new, h], [dxn, dh])
    want = _reference_grads(*inputs, dxn, dh, None, stored_x_new=x_new)
    for name, got, w in zip(NAMES, inputs, want):
        assert got.grad.dtype == dtype
        assert_close(got.grad, w, kind="grad", msg=f"{name} {backend} {dtype} {shape}")

    plain = [t.detach().requires_grad_() for t in inputs[:3]]
    with use_backend(backend):
        gated_residual(*plain).backward(dout)
    ref = [t.detach().double().requires_grad_() for t in plain]
    gated_residual_ref(*ref).backward(dout.double())
    for name, got, w in zip(NAMES, plain, ref):
        assert_close(got.grad, w.grad, kind="grad", msg=f"plain {name} {backend} {dtype} {shape}")


@pytest.mark.parametrize("which", ["h_only", "x_new_only"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradients_with_one_output_used(backend, device, which):
    require(OP, backend, device)
    inputs = [t.requires_grad_() for t in make_inputs(2, 5, 72, device=device, strided=True)]
    d = torch.randn(2, 5, 72, generator=torch.Generator().manual_seed(2)).to(device)
    with use_backend(backend):
        x_new, h = gated_residual_ln_modulate(*inputs)
        ((h if which == "h_only" else x_new) * d).sum().backward()
    want = _reference_grads(*inputs, None if which == "h_only" else d,
                            d if which == "h_only" else torch.zeros_like(d), None)
    for name, got, w in zip(NAMES, [t for t in inputs], want):
        if got.grad is None:  # no path to the loss (shift/scale when only x_new is used)
            assert which == "x_new_only" and name in ("dshift", "dscale")
            continue
        assert_close(got.grad, w, kind="grad", msg=f"{name} {backend} {which}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    require(OP, backend, "cpu", torch.float64)
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 16, dtype=torch.float64, strided=True)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: gated_residual_ln_modulate(*a), inputs)
        assert torch.autograd.gradcheck(lambda *a: gated_residual(*a), inputs[:3])


@needs_c
def test_backends_can_be_mixed_between_forward_and_backward():
    inputs = [t.requires_grad_() for t in make_inputs(3, 7, 72)]
    with use_backend("reference"):
        x_new, h = gated_residual_ln_modulate(*inputs)
    with use_backend("cpu"):
        (x_new.sum() + (h * h).sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in inputs]
    rx, rh = gated_residual_ln_modulate_ref(*ref)
    (rx.sum() + (rh * rh).sum()).backward()
    for got, want in zip(inputs, ref):
        assert_close(got.grad, want.grad, kind="grad")


# ---- torch.library / torch.compile ----------------------------------------------------------

def _opcheck_backwards(fused_bwd, plain_bwd, fwd, y, gate, scale, utils):
    """opcheck of the fused op's backward (with and without dx_new) given its forward's outputs
    `fwd` (x_new, h, mean, rstd), and of the plain op's backward."""
    x_new, _, mean, rstd = fwd
    d = torch.randn_like(x_new)
    for dxn in (d, None):
        torch.library.opcheck(fused_bwd, (dxn, d, x_new, y, gate, scale, mean, rstd), test_utils=utils)
    torch.library.opcheck(plain_bwd, (d, y, gate), test_utils=utils)


@pytest.mark.parametrize("backend,device", backend_devices(slow=(FULL_OPCHECK_BACKEND,)))
def test_opcheck_custom_ops(backend, device):
    require(OP, backend, device)
    utils = opcheck_utils(backend)
    x, y, gate, shift, scale = make_inputs(2, 5, 72, device=device)
    with use_backend(backend):
        for rg in (False, True):
            args = [t.detach().clone().requires_grad_(rg) for t in (x, y, gate, shift, scale)]
            torch.library.opcheck(torch.ops.dit_fast.gated_residual_ln_modulate.default,
                                  (*args, 1e-6), test_utils=utils)
            torch.library.opcheck(torch.ops.dit_fast.gated_residual.default, tuple(args[:3]),
                                  test_utils=utils)
        _opcheck_backwards(torch.ops.dit_fast.gated_residual_ln_modulate_backward.default,
                           torch.ops.dit_fast.gated_residual_backward.default,
                           G._forward(x, y, gate, shift, scale, 1e-6), y, gate, scale, utils)


@needs_c
def test_opcheck_native_ops():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        utils = ALL_OPCHECK if dtype == torch.float32 else QUICK_OPCHECK
        x, y, gate, shift, scale = make_inputs(2, 5, 72, dtype=dtype, strided=True)
        torch.library.opcheck(torch.ops.dit_fast.gated_residual_ln_modulate_fwd.default,
                              (x, y, gate, shift, scale, 1e-6), test_utils=utils)
        fwd = torch.ops.dit_fast.gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, 1e-6)
        assert fwd[2].dtype == fwd[3].dtype == G._stats_dtype(dtype) and fwd[2].shape == (2, 5)
        torch.library.opcheck(torch.ops.dit_fast.gated_residual_fwd.default, (x, y, gate),
                              test_utils=utils)
        _opcheck_backwards(torch.ops.dit_fast.gated_residual_ln_modulate_bwd.default,
                           torch.ops.dit_fast.gated_residual_bwd.default, fwd, y, gate, scale, utils)


def test_torch_compile_fullgraph():
    """A DiT-block-shaped residual chain traced without graph breaks (aot_eager: fake tensors,
    functionalization and the registered autograd); forward and backward match the reference."""
    def block(x, y, gate, shift, scale, gate2):
        x, h = gated_residual_ln_modulate(x, y, gate, shift, scale)
        return gated_residual(x, torch.tanh(h), gate2)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in make_inputs(2, 5, 72)]
    gate2 = (0.5 * torch.randn(2, 72)).requires_grad_()
    out = compiled(*inputs, gate2)
    ref = [t.detach().double().requires_grad_() for t in (*inputs, gate2)]
    rx, rh = gated_residual_ln_modulate_ref(*ref[:5])
    rout = gated_residual_ref(rx, torch.tanh(rh), ref[5])
    assert_close(out, rout)
    out.sum().backward()
    rout.sum().backward()
    for got, want in zip((*inputs, gate2), ref):
        assert_close(got.grad, want.grad, kind="grad")


def test_torch_compile_graph_has_the_ops():
    inputs = make_inputs(2, 3, 16)
    out, targets = compile_and_trace(
        lambda *a: gated_residual_ln_modulate(*a)[1] + gated_residual(*a[:3]), *inputs)
    assert_close(out, gated_residual_ln_modulate_ref(*inputs)[1].double()
                 + gated_residual_ref(*inputs[:3]).double())
    assert torch.ops.dit_fast.gated_residual_ln_modulate.default in targets
    assert torch.ops.dit_fast.gated_residual.default in targets


# ---- validation and backend errors ----------------------------------------------------------

def _bad_inputs():
    x, y, g, sh, sc = make_inputs(2, 3, 8)
    return [
        ("x must be 3-D", (x[0], y[0], g, sh, sc), {}),
        ("x must be a floating-point", (x.long(), y.long(), g.long(), sh.long(), sc.long()), {}),
        ("y must have the shape of x", (x, y[:, :2], g, sh, sc), {}),
        ("gate must have shape", (x, y, g[:1], sh, sc), {}),
        ("shift must have shape", (x, y, g, sh[:, :4], sc), {}),
        ("scale must have shape", (x, y, g, sh, sc[None]), {}),
        ("y must have the same dtype", (x, y.double(), g, sh, sc), {}),
        ("gate must have the same dtype", (x, y, g.double(), sh, sc), {}),
        ("scale must be on the same device", (x, y, g, sh, sc.to("meta")), {}),
        ("eps must be >= 0", (x, y, g, sh, sc), {"eps": -1.0}),
        ("shift must be a torch.Tensor", (x, y, g, 0.5, sc), {}),
    ]


@pytest.mark.parametrize("match,args,kwargs", match_cases(_bad_inputs()))
def test_invalid_inputs_raise_value_error(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        gated_residual_ln_modulate(*args, **kwargs)


@pytest.mark.parametrize("match,args", [
    ("x must be 3-D", lambda x, y, g: (x[0], y, g)),
    ("y must have the shape of x", lambda x, y, g: (x, y[:1], g)),
    ("gate must have shape", lambda x, y, g: (x, y, g[:, :3])),
    ("gate must have the same dtype", lambda x, y, g: (x, y, g.double())),
    ("y must be a torch.Tensor", lambda x, y, g: (x, None, g)),
])
def test_plain_invalid_inputs_raise_value_error(match, args):
    x, y, g, _, _ = make_inputs(2, 3, 8)
    with pytest.raises(ValueError, match=match):
        gated_residual(*args(x, y, g))


def test_auto_never_picks_the_triton_interpreter_for_cpu_tensors():
    for op in (OP, OP_PLAIN):
        assert_auto_picks_no_interpreter(op, torch.empty(1, 1, 8))


@needs_c
def test_forced_backend_that_cannot_run_raises():
    x, y, g, sh, sc = (t.half() for t in make_inputs(2, 3, 8))
    with use_backend("cpu"), pytest.raises(RuntimeError, match="does not support torch.float16"):
        gated_residual_ln_modulate(x, y, g, sh, sc)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="runs on cuda tensors"):
        gated_residual(x, y, g)


# ---- CPU-kernel specifics -------------------------------------------------------------------


@needs_c
def test_every_cpu_isa_path():
    x, y, gate, shift, scale = make_inputs(3, 33, 1000, dtype=torch.bfloat16, strided=True)
    d = torch.randn_like(x)
    with each_cpu_isa() as isas:
        for isa in isas:
            with use_backend("cpu"):
                x_new, h = gated_residual_ln_modulate(x, y, gate, shift, scale)
                check_forward(x_new, h, x, y, gate, shift, scale, msg=isa)
                _, _, mean, rstd = G._forward(x, y, gate, shift, scale, 1e-6)
                got = G._BWD["cpu"](d, d, x_new, y, gate, scale, mean, rstd)
            want = G._bwd_reference(d, d, x_new, y, gate, scale, mean, rstd)
            for a, b in zip(got, want):
                assert_close(a, b.double(), kind="grad", msg=isa)


@needs_c
def test_cpu_results_independent_of_thread_count():
    x, y, gate, shift, scale = make_inputs(2, 67, 40)
    d = torch.randn_like(x)

    def run():
        fwd = torch.ops.dit_fast.gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, 1e-6)
        bwd = torch.ops.dit_fast.gated_residual_ln_modulate_bwd(d, d, fwd[0], y, gate, scale,
                                                                 fwd[2], fwd[3])
        return *fwd, *bwd, *torch.ops.dit_fast.gated_residual_bwd(d, y, gate)

    assert_thread_count_independent(run)


@needs_c
@pytest.mark.parametrize("match,fn", [
    ("x must be contiguous", lambda x, y, g: torch.ops.dit_fast.gated_residual_ln_modulate_fwd(
        x.transpose(1, 2), y, g, g, g, 1e-6)),
    ("y must have shape", lambda x, y, g: torch.ops.dit_fast.gated_residual_ln_modulate_fwd(
        x, y[:, :1], g, g, g, 1e-6)),
    ("gate must have unit stride", lambda x, y, g: torch.ops.dit_fast.gated_residual_fwd(
        x, y, torch.randn(2, 16)[:, ::2])),
    ("shift must have the same dtype", lambda x, y, g: torch.ops.dit_fast.gated_residual_ln_modulate_fwd(
        x, y, g, g.double(), g, 1e-6)),
    ("x has unsupported dtype", lambda x, y, g: torch.ops.dit_fast.gated_residual_fwd(
        x.half(), y.half(), g.half())),
    ("dx_new must have shape", lambda x, y, g: torch.ops.dit_fast.gated_residual_ln_modulate_bwd(
        x[:, :1], x, x, y, g, g, torch.zeros(2, 3), torch.ones(2, 3))),
    ("mean must have dtype", lambda x, y, g: torch.ops.dit_fast.gated_residual_ln_modulate_bwd(
        None, x, x, y, g, g, torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3))),
    ("gate must have shape", lambda x, y, g: torch.ops.dit_fast.gated_residual_bwd(x, y, g[:1])),
])
def test_native_op_checks_name_the_argument(match, fn):
    x, y, g, _, _ = make_inputs(2, 3, 8)
    with pytest.raises(RuntimeError, match=match):
        fn(x, y, g)
