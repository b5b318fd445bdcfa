"""dit_fast.ops.gelu: gelu_bias and linear_gelu, every available backend against the PyTorch
reference (``F.gelu(h + bias, approximate="tanh")``, i.e. nn.GELU(approximate="tanh")).

Ground truth is the reference evaluated in float64 on the same input values (dit_fast/tolerances.py).
The Triton backend runs under Triton's interpreter on CPU tensors when there is no GPU
(TRITON_INTERPRET=1, set by conftest.py). Backends that cannot run here are skipped with the
registry's reason.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from dit_fast._backends import use_backend
from dit_fast.ops import gelu_bias, gelu_bias_ref, linear_gelu, linear_gelu_ref
from dit_fast.tolerances import assert_close
from op_helpers import (ALL_OPCHECK, BACKEND_DEVICES, DTYPES, FULL_OPCHECK_BACKEND, QUICK_OPCHECK,
                        assert_auto_picks_no_interpreter, assert_thread_count_independent,
                        backend_devices, compile_and_trace, dtype_id, each_backend_dtype_shape,
                        each_cpu_isa, match_cases, needs_c, opcheck_utils, require)

GE = importlib.import_module("dit_fast.ops.gelu")
OP = GE.OP_NAME

# h shapes (..., F): F = 72, 1000, 1152, 288 (= 4 * 72, DiT's mlp_ratio), token counts 1, 7, 257
SHAPES = [(1, 72), (7, 1000), (3, 7, 1152), (1, 257, 72), (3, 1, 288), (2, 7, 4608)]
GRAD_SHAPES = [(1, 72), (3, 7, 1000), (1, 257, 288)]


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """h ~ 2.5 N(0, 1): both tails of the GELU and the region around 0; bias ~ 0.5 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    h = 2.5 * torch.randn(shape, generator=g)
    bias = 0.5 * torch.randn(shape[-1], generator=g)
    return h.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)


def truth(h, bias):
    return gelu_bias_ref(h.double(), bias.double())


# ---- forward --------------------------------------------------------------------------------

@each_backend_dtype_shape(SHAPES)
def test_forward_matches_reference(backend, device, dtype, shape):
    require(OP, backend, device, dtype, fp16_reference=False)
    h, bias = make_inputs(shape, dtype, device)
    with use_backend(backend):
        out = gelu_bias(h, bias)
    assert out.shape == h.shape and out.dtype == dtype and out.device == h.device
    assert_close(out, truth(h, bias), msg=f"{backend} {dtype} {shape}")


def test_reference_is_torchs_gelu_tanh():
    h, bias = make_inputs((5, 72))
    assert torch.equal(gelu_bias_ref(h, bias), torch.nn.GELU(approximate="tanh")(h + bias))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # Triton's interpreter:
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, masked
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_extreme_values(backend, device):
    """Far tails: exactly 0 below about -10 and exactly v above about 10 (no inf * 0 inside)."""
    require(OP, backend, device)
    h = torch.tensor([[-1e4, -100.0, -30.0, -10.0, -5.0, -1e-3, 0.0, 1e-30, 1e-3, 5.0, 10.0, 30.0,
                       100.0, 1e4, 3e38, -3e38]], device=device)
    bias = torch.zeros(h.shape[-1], device=device)
    with use_backend(backend):
        out = gelu_bias(h, bias)
        hr = h.clone().requires_grad_()
        gelu_bias(hr, bias).sum().backward()
    want = truth(h, bias)
    assert_close(out, want)
    assert torch.all(out[0, :4] == 0) and out[0, 6] == 0 and torch.equal(out[0, 10:15], h[0, 10:15])
    assert out[0, 15] == 0
    if backend != "reference":  # torch's gelu_backward gives NaN at +-3e38 (0 * inf); ours 1 / 0
        assert torch.isfinite(hr.grad).all()
    assert_close(hr.grad[:, 1:-2], torch.ops.aten.gelu_backward(
        torch.ones_like(want), h.double(), approximate="tanh")[:, 1:-2], kind="grad")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_and_empty(backend, device):
    require(OP, backend, device)
    h, bias = make_inputs((6, 72), device=device)
    with use_backend(backend):
        ht = h.t().contiguous().t()
        assert not ht.is_contiguous()
        assert_close(gelu_bias(ht, bias), truth(h, bias))
        b2 = torch.randn(144, device=device)[::2]
        assert_close(gelu_bias(h, b2), truth(h, b2))
        for shape in ((0, 16), (2, 0, 16), (3, 0)):
            he = torch.randn(shape, device=device, requires_grad=True)
            be = torch.randn(shape[-1], device=device, requires_grad=True)
            out = gelu_bias(he, be)
            assert out.shape == he.shape
            out.sum().backward()
            assert torch.equal(be.grad, torch.zeros_like(be))


# ---- backward -------------------------------------------------------------------------------

@each_backend_dtype_shape(GRAD_SHAPES)
def test_gradients_match_reference(backend, device, dtype, shape):
    require(OP, backend, device, dtype, fp16_reference=False)
    h, bias = (t.requires_grad_() for t in make_inputs(shape, dtype, device))
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device,
                                                                            dtype=dtype)
    with use_backend(backend):
        gelu_bias(h, bias).backward(dout)
    ref = [t.detach().double().requires_grad_() for t in (h, bias)]
    gelu_bias_ref(*ref).backward(dout.double())
    for name, got, want in zip(("dh", "dbias"), (h, bias), ref):
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad, kind="grad", msg=f"{name} {backend} {dtype} {shape}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    require(OP, backend, "cpu", torch.float64)
    h, bias = (t.requires_grad_() for t in make_inputs((3, 5, 16), torch.float64))
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(gelu_bias, (h, bias))
        assert torch.autograd.gradcheck(linear_gelu, (x, w, bias))


# ---- linear_gelu ------------------------------------------------------------------------------

def make_linear(N, T, K, Fdim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, K, generator=g)
    w = torch.randn(Fdim, K, generator=g) * (2.0 / K ** 0.5)
    b = 0.5 * torch.randn(Fdim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_linear_gelu(backend, device, dtype):
    require(OP, backend, device, dtype, fp16_reference=False)
    x, w, b = make_linear(2, 7, 72, 288, dtype, device)
    with use_backend(backend):
        out = linear_gelu(x, w, b)                       # eager inference: in place on the GEMM out
        unfused = gelu_bias(F.linear(x, w), b)
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        out_g = linear_gelu(xg, wg, bg)                   # autograd path
        dout = torch.randn_like(out_g)
        out_g.backward(dout)
    assert out.shape == (2, 7, 288) and out.dtype == dtype
    if backend == "triton":  # one GEMM kernel with the epilogue: no rounding of x @ W.T + b
        assert_close(out, linear_gelu_ref(*(t.double() for t in (x, w, b))))
        assert_close(out_g.detach(), gelu_bias_ref(F.linear(x, w).double(), b.double()))
    elif backend == "reference":  # the official expression, bit for bit, with and without grad
        official = F.gelu(F.linear(x, w, b), approximate="tanh")
        assert torch.equal(out, official) and torch.equal(out_g.detach(), official)
        assert_close(out, linear_gelu_ref(*(t.double() for t in (x, w, b))))
    else:
        assert torch.equal(out, unfused) and torch.equal(out_g.detach(), out)
        # ground truth: the GEMM rounded to the storage dtype (as F.linear returns it), then exact
        assert_close(out, gelu_bias_ref(F.linear(x, w).double(), b.double()))
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    linear_gelu_ref(*ref).backward(dout.double())
    if dtype == torch.float32:
        for name, got, want in zip(("dx", "dweight", "dbias"), (xg, wg, bg), ref):
            assert_close(got.grad, want.grad, kind="grad", msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend,device", backend_devices("triton"))
def test_triton_linear_gelu_kernel_shapes(backend, device, dtype):
    """The Triton GEMM + bias + GELU kernel: partial tiles in M, N and K, 2-D and 3-D x, a
    non-contiguous weight, and the empty cases."""
    require(OP, backend, device, dtype, fp16_reference=False)
    k = GE._triton()
    g = torch.Generator().manual_seed(3)
    for xs, K, Fd in (((1, 1, 33), 33, 100), ((3, 7, 72), 72, 288), ((70, 40), 40, 1000)):
        x = torch.randn(*xs, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(Fd, K, generator=g) / K ** 0.5).to(device=device, dtype=dtype)
        b = (0.5 * torch.randn(Fd, generator=g)).to(device=device, dtype=dtype)
        out = k.linear_gelu_fwd(x, w, b)
        assert out.shape == (*xs[:-1], Fd) and out.dtype == dtype
        assert_close(out, linear_gelu_ref(x.double(), w.double(), b.double()), msg=f"{xs} {Fd}")
    wt = torch.randn(40, 16, device=device, dtype=dtype).t()  # (16, 40), non-contiguous
    x = torch.randn(5, 40, device=device, dtype=dtype)
    b = torch.randn(16, device=device, dtype=dtype)
    assert_close(k.linear_gelu_fwd(x, wt, b), linear_gelu_ref(x.double(), wt.double(), b.double()))
    assert k.linear_gelu_fwd(x[:0], wt, b).shape == (0, 16)
    assert_close(k.linear_gelu_fwd(x[:, :0], wt[:, :0], b), gelu_bias_ref(
        torch.zeros(5, 16, dtype=torch.float64), b.double()))


def test_linear_gelu_matches_dit_mlp_fc1_act():
    from dit_fast.models.dit import Mlp
    mlp = Mlp(72, 288)
    x = torch.randn(2, 5, 72)
    with torch.no_grad():
        assert_close(linear_gelu(x, mlp.fc1.weight, mlp.fc1.bias),
                     mlp.act(mlp.fc1(x.double().float())).double())


# ---- torch.library / torch.compile ----------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_devices(slow=(FULL_OPCHECK_BACKEND,)))
def test_opcheck_custom_ops(backend, device):
    require(OP, backend, device)
    utils = opcheck_utils(backend)
    h, bias = make_inputs((2, 3, 72), device=device)
    with use_backend(backend):
        for rg in (False, True):
            args = [t.detach().clone().requires_grad_(rg) for t in (h, bias)]
            torch.library.opcheck(torch.ops.dit_fast.gelu_bias.default, tuple(args),
                                  test_utils=utils)
        torch.library.opcheck(torch.ops.dit_fast.gelu_bias_backward.default,
                              (torch.randn_like(h), h, bias), test_utils=utils)


@needs_c
def test_opcheck_native_ops():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        utils = ALL_OPCHECK if dtype == torch.float32 else QUICK_OPCHECK
        h, bias = make_inputs((2, 3, 72), dtype)
        torch.library.opcheck(torch.ops.dit_fast.gelu_bias_fwd.default, (h, bias), test_utils=utils)
        torch.library.opcheck(torch.ops.dit_fast.gelu_bias_fwd_.default, (h.clone(), bias),
                              test_utils=utils)
        torch.library.opcheck(torch.ops.dit_fast.gelu_bias_bwd.default,
                              (torch.randn_like(h), h, bias), test_utils=utils)


@needs_c
def test_native_inplace_op_overwrites_its_input():
    h, bias = make_inputs((4, 1000))
    want = torch.ops.dit_fast.gelu_bias_fwd(h, bias)
    ptr = h.data_ptr()
    assert torch.ops.dit_fast.gelu_bias_fwd_(h, bias) is None
    assert h.data_ptr() == ptr and torch.equal(h, want)


def test_torch_compile_fullgraph():
    """An MLP-shaped chain traced without graph breaks (aot_eager: fake tensors, functionalization
    and the registered autograd); forward and backward match the reference."""
    def mlp(x, w1, b1, b2):
        return gelu_bias(linear_gelu(x, w1, b1), b2)

    x, w1, b1 = (t.requires_grad_() for t in make_linear(2, 5, 16, 24))
    b2 = torch.randn(24, requires_grad=True)
    out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x, w1, b1, b2)
    ref = [t.detach().double().requires_grad_() for t in (x, w1, b1, b2)]
    rout = gelu_bias_ref(linear_gelu_ref(*ref[:3]), ref[3])
    assert_close(out, rout)
    out.sum().backward()
    rout.sum().backward()
    for got, want in zip((x, w1, b1, b2), ref):
        assert_close(got.grad, want.grad, kind="grad")
    traced, targets = compile_and_trace(mlp, x, w1, b1, b2)
    assert torch.ops.dit_fast.gelu_bias.default in targets
    assert_close(traced, rout)


# ---- validation -------------------------------------------------------------------------------

def _bad_gelu():
    h, b = make_inputs((2, 8))
    return [
        ("h must have at least one dimension", (h[0, 0], b[:1])),
        ("h must be a floating-point", (h.long(), b.long())),
        ("bias must have shape", (h, b[:4])),
        ("bias must have shape", (h, b[None])),
        ("bias must have the same dtype", (h, b.double())),
        ("bias must be on the same device", (h, b.to("meta"))),
        ("bias must be a torch.Tensor", (h, 0.5)),
        ("h must be a torch.Tensor", ([1.0], b)),
    ]


@pytest.mark.parametrize("match,args", match_cases(_bad_gelu()))
def test_gelu_invalid_inputs_raise_value_error(match, args):
    with pytest.raises(ValueError, match=match):
        gelu_bias(*args)


def _bad_linear():
    x, w, b = make_linear(2, 3, 8, 12)
    return [
        ("weight must have shape", (x, w[:, :4], b)),
        ("weight must have shape", (x, w[0], b)),
        ("bias must have shape", (x, w, b[:5])),
        ("weight must have the same dtype", (x, w.double(), b)),
        ("bias must have the same dtype", (x, w, b.double())),
        ("bias must be on the same device", (x, w, b.to("meta"))),
        ("x must be a floating-point", (x.long(), w, b)),
        ("weight must be a torch.Tensor", (x, None, b)),
    ]


@pytest.mark.parametrize("match,args", match_cases(_bad_linear()))
def test_linear_gelu_invalid_inputs_raise_value_error(match, args):
    with pytest.raises(ValueError, match=match):
        linear_gelu(*args)


def test_auto_never_picks_the_triton_interpreter_for_cpu_tensors():
    assert_auto_picks_no_interpreter(OP, torch.empty(2, 8))


# ---- CPU-kernel specifics -------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_every_cpu_isa_path(dtype):
    """The AVX2 path (vectorized exp, 8-wide with padded row tails) and the generic scalar path
    both match the reference; F = 1003 exercises the tails."""
    h, bias = make_inputs((5, 1003), dtype)
    dout = torch.randn_like(h)
    want = truth(h, bias)
    ref = [t.double().requires_grad_() for t in (h, bias)]
    gelu_bias_ref(*ref).backward(dout.double())
    with each_cpu_isa() as isas:
        for isa in isas:
            assert_close(torch.ops.dit_fast.gelu_bias_fwd(h, bias), want, msg=isa)
            dh, db = torch.ops.dit_fast.gelu_bias_bwd(dout, h, bias)
            assert_close(dh, ref[0].grad, kind="grad", msg=isa)
            assert_close(db, ref[1].grad, kind="grad", msg=isa)


@needs_c
def test_cpu_results_independent_of_thread_count():
    h, bias = make_inputs((301, 40))
    dout = torch.randn_like(h)
    assert_thread_count_independent(lambda: (torch.ops.dit_fast.gelu_bias_fwd(h, bias),
                                             *torch.ops.dit_fast.gelu_bias_bwd(dout, h, bias)))


@needs_c
@pytest.mark.parametrize("match,fn", [
    ("h must be contiguous", lambda h, b: torch.ops.dit_fast.gelu_bias_fwd(h.t(), b)),
    ("bias must have shape", lambda h, b: torch.ops.dit_fast.gelu_bias_fwd(h, b[:3])),
    ("bias must have the same dtype as h",
     lambda h, b: torch.ops.dit_fast.gelu_bias_fwd_(h, b.double())),
    ("h has unsupported dtype", lambda h, b: torch.ops.dit_fast.gelu_bias_fwd(h.half(), b.half())),
    ("dout must have shape", lambda h, b: torch.ops.dit_fast.gelu_bias_bwd(h[:1], h, b)),
    ("bias must be contiguous",
     lambda h, b: torch.ops.dit_fast.gelu_bias_bwd(h, h, torch.randn(16)[::2])),
])
def test_native_op_checks_name_the_argument(match, fn):
    h, b = make_inputs((4, 8))
    with pytest.raises(RuntimeError, match=match):
        fn(h, b)
