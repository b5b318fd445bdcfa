"""dit_fast.ops.attention: every available backend against a float64 ground truth.

The flash-attention accuracy rule: for each backend and dtype, the max error against
`attention_ref` evaluated in float64 on the same (rounded) inputs must be at most twice the error
of PyTorch's own SDPA at the same precision (`attention_ref` in that dtype, on the same device),
plus an absolute floor set by the dtype's resolution at that size (tests/error_rule.py), for the
output and for the gradient w.r.t. qkv (dq, dk, dv together).

Why the floor: SDPA's error moves with the CPU (AVX-512 is more accurate than AVX2) and can be
(almost) zero, and, for fp16/bf16 under the interpreter, PyTorch's *CPU* SDPA keeps the softmax
probabilities in fp32, while our kernels round P (and dS) to the input dtype before their matmuls
exactly as flash-attn and CUDA SDPA do, which costs up to about one ulp more (measured here: bf16
output error up to 2.45x CPU SDPA's, e.g. 0.022 vs 0.009 at T = 65, Dh = 72). On a GPU the
baseline is CUDA SDPA, which rounds P the same way.

Triton kernels: on a GPU through the dispatcher; without one, under Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1), calling the kernel wrappers directly, with
small shapes (the interpreter is slow). Backends that cannot run here are skipped with the
registry's reason.
"""

import importlib
import importlib.util

import pytest
import torch

from dit_fast import _backends
from dit_fast._backends import use_backend
from dit_fast.ops import attention_qkv, attention_ref
from error_rule import FP32_EPS, TF32_EPS, error_floor
from op_helpers import (HAS_C, HAS_CUDA, HAS_TRITON, INTERPRET, assert_thread_count_independent,
                        compile_and_trace, dtype_id, each_cpu_isa, needs_c, require, shape_id)

A = importlib.import_module("dit_fast.ops.attention")
OP = A.OP_NAME
TRITON_CPU = HAS_TRITON and INTERPRET  # the interpreter on CPU tensors


# ---- helpers --------------------------------------------------------------------------------

def make_qkv(N, T, H, Dh, dtype=torch.float32, device="cpu", seed=0, scale=1.5):
    """qkv (N, T, 3*H*Dh); `scale` > 1 makes the softmax rows peakier than unit Gaussians."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(N, T, 3 * H * Dh, generator=g)).to(device=device, dtype=dtype)


def make_dout(qkv, H, seed=1):
    N, T, C = qkv.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, C // 3, generator=g).to(device=qkv.device, dtype=qkv.dtype)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0




def truth_fwd_bwd(qkv, H, dout):
    x = qkv.detach().double().requires_grad_()
    y = attention_ref(x, H)
    y.backward(dout.double())
    return y.detach(), x.grad


def sdpa_fwd_bwd(qkv, H, dout):
    """PyTorch's own SDPA at qkv's precision and device (the model's expression)."""
    x = qkv.detach().clone().requires_grad_()
    y = attention_ref(x, H)
    y.backward(dout)
    return y.detach(), x.grad


def check_rule(name, got, sdpa, truth, dtype, K, factor=2.0, dot_eps=FP32_EPS):
    """got's error <= factor x SDPA's + the floor for sums of K = max(T, head dim) terms."""
    e, e_sdpa = err(got, truth), err(sdpa, truth)
    # c = 2: our kernels reached 1.0x (fp32, K = 64..130, on AVX2 and AVX-512), 0.3x in TF32 mode
    fl = error_floor(truth.abs().max().item() if truth.numel() else 0.0, dtype, K, 2.0, dot_eps)
    assert e <= factor * e_sdpa + fl, (f"{name}: error {e:.3g} > {factor} x SDPA error {e_sdpa:.3g}"
                                       f" + floor {fl:.3g} (ratio {e / max(e_sdpa, 1e-300):.2f})")
    return e / e_sdpa if e_sdpa > 0 else float("nan")


# ---- CPU backends (C++ kernel; reference) ---------------------------------------------------

CPU_SHAPES = [(1, 1, 2, 64), (2, 7, 3, 64), (1, 65, 2, 72),
              pytest.param((2, 257, 1, 64), marks=pytest.mark.slow), (1, 16, 4, 72), (1, 9, 2, 40)]
CPU_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_forward_and_backward_flash_rule(backend, dtype, shape):
    """Output (eager fast path) and qkv gradient (custom-op path) within 2x SDPA's error."""
    N, T, H, Dh = shape
    require(OP, backend, "cpu", dtype)
    qkv = make_qkv(N, T, H, Dh, dtype)
    dout = make_dout(qkv, H)
    y_true, g_true = truth_fwd_bwd(qkv, H, dout)
    y_sdpa, g_sdpa = sdpa_fwd_bwd(qkv, H, dout)
    with use_backend(backend):
        y = attention_qkv(qkv, H)
        x = qkv.clone().requires_grad_()
        y2 = attention_qkv(x, H)
        y2.backward(dout)
    assert y.shape == (N, T, H * Dh) and y.dtype == dtype
    assert x.grad.shape == qkv.shape and x.grad.dtype == dtype
    K = max(T, Dh)
    check_rule("out", y, y_sdpa, y_true, dtype, K)
    check_rule("out (grad path)", y2.detach(), y_sdpa, y_true, dtype, K)
    check_rule("dqkv", x.grad, g_sdpa, g_true, dtype, K)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_reference_custom_op_kernels_flash_rule(dtype):
    """The explicit-math reference used inside the custom op (torch.compile / mixed backends)."""
    N, T, H, Dh = 2, 33, 2, 72
    qkv = make_qkv(N, T, H, Dh, dtype)
    dout = make_dout(qkv, H)
    y_true, g_true = truth_fwd_bwd(qkv, H, dout)
    y_sdpa, g_sdpa = sdpa_fwd_bwd(qkv, H, dout)
    out, lse = A._fwd_reference(qkv, H)
    assert lse.dtype == torch.float32 and lse.shape == (N, H, T)
    check_rule("out", out, y_sdpa, y_true, dtype, max(T, Dh))
    check_rule("dqkv", A._bwd_reference(dout, qkv, out, lse, H), g_sdpa, g_true, dtype, max(T, Dh))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    require(OP, backend, "cpu", torch.float64)
    qkv = make_qkv(2, 5, 2, 8, torch.float64, scale=1.0).requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: attention_qkv(x, 2), (qkv,))
        # the custom op itself (for reference: the explicit-math kernels, not attention_ref)
        assert torch.autograd.gradcheck(lambda x: A._attention_op(x, 2)[0], (qkv,))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_strided_inputs(backend):
    """qkv with padded rows (a slice of a wider tensor), every other token, or a non-unit last
    stride (copied once) gives the same result as the contiguous tensor."""
    require(OP, backend, "cpu")
    N, T, H, Dh = 2, 9, 2, 64
    C = 3 * H * Dh
    wide = make_qkv(N, 2 * T, H, Dh + 4)[..., :C]               # row stride 3*H*(Dh+4)
    every_other = wide[:, ::2]                                   # token stride 2 rows
    nonunit = torch.randn(N, T, 2 * C)[..., ::2]                 # last-dim stride 2
    with use_backend(backend):
        for x in (wide, every_other, nonunit):
            assert not x.is_contiguous()
            want = attention_ref(x.contiguous().double(), H)
            got = attention_qkv(x, H)
            torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
            xg = x.detach().requires_grad_()
            attention_qkv(xg, H).sum().backward()
            xr = x.detach().contiguous().double().requires_grad_()
            attention_ref(xr, H).sum().backward()
            torch.testing.assert_close(xg.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_inputs(backend):
    require(OP, backend, "cpu")
    with use_backend(backend):
        for N, T in ((0, 4), (2, 0)):
            x = torch.randn(N, T, 3 * 2 * 8, requires_grad=True)
            y = attention_qkv(x, 2)
            assert y.shape == (N, T, 16)
            y.sum().backward()
            assert x.grad.shape == x.shape and not x.grad.any()
            assert attention_qkv(x.detach(), 2).shape == (N, T, 16)


@needs_c
def test_backends_can_be_mixed_between_forward_and_backward():
    qkv = make_qkv(2, 7, 2, 64)
    dout = make_dout(qkv, 2)
    _, g_true = truth_fwd_bwd(qkv, 2, dout)
    for fwd, bwd in (("cpu", "reference"), ("reference", "cpu")):
        x = qkv.clone().requires_grad_()
        with use_backend(fwd):
            y = A._attention_op(x, 2)[0]
        with use_backend(bwd):
            y.backward(dout)
        torch.testing.assert_close(x.grad.double(), g_true, atol=2e-5, rtol=1e-5)


# ---- C++ kernel specifics -------------------------------------------------------------------

@needs_c
def test_auto_selection_on_cpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert A._select(make_qkv(1, 2, 2, 8, dtype), 2) == "cpu"
    assert A._select(make_qkv(1, 2, 2, 8, torch.float16), 2) == "reference"
    ex = A.explain(make_qkv(1, 2, 2, 8), 2)
    assert list(ex) == ["cpu", "reference", "cuda", "triton"]  # auto's CPU order, then the rest
    assert ex["cpu"] is None and ex["reference"] is None
    assert "cuda" in ex["triton"] and "cuda" in ex["cuda"]


@needs_c
def test_every_cpu_isa_path_and_lse():
    qkv = make_qkv(2, 67, 3, 72)
    H = 3
    with each_cpu_isa() as isas:
        for isa in isas:
            # (|out| reaches ~5 here; bf16: one rounding of an fp32-accurate result)
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)):
                out, lse = torch.ops.dit_fast.attention_fwd(qkv.to(dtype), H)
                assert lse.dtype == A._stats_dtype(dtype) and lse.shape == (2, H, 67)
                assert out.dtype == dtype and out.shape == (2, 67, H * 72)
                want_out, want_lse = A._fwd_reference(qkv.to(dtype).double(), H)
                ltol = 1e-12 if dtype == torch.float64 else 1e-5
                assert err(out, want_out) <= tol * (1 + want_out.abs().max().item()), (isa, dtype)
                assert err(lse, want_lse) <= ltol * (1 + want_lse.abs().max().item()), (isa, dtype)


@needs_c
def test_cpu_results_independent_of_thread_count():
    qkv = make_qkv(2, 130, 3, 64)
    assert_thread_count_independent(lambda: torch.ops.dit_fast.attention_fwd(qkv, 3))


@needs_c
def test_cpu_nan_propagates():
    qkv = make_qkv(1, 20, 1, 64)
    qkv[0, 3, 64 + 5] = float("nan")  # one key element
    out, lse = torch.ops.dit_fast.attention_fwd(qkv, 1)
    assert out.isnan().all() and lse.isnan().all()


@needs_c
def test_eager_fast_path_matches_custom_op_path():
    qkv = make_qkv(2, 7, 2, 72)
    with use_backend("cpu"):
        fast = attention_qkv(qkv, 2)
        via_op = torch.ops.dit_fast.attention(qkv, 2)[0]
    assert torch.equal(fast, via_op)


@needs_c
@pytest.mark.parametrize("match,fn", [
    ("qkv must be a 3-D", lambda q: torch.ops.dit_fast.attention_fwd(q[0], 2)),
    ("multiple of 3 \\* num_heads", lambda q: torch.ops.dit_fast.attention_fwd(q[..., :-1], 2)),
    ("num_heads must be positive", lambda q: torch.ops.dit_fast.attention_fwd(q, 0)),
    ("unsupported dtype", lambda q: torch.ops.dit_fast.attention_fwd(q.half(), 2)),
    ("unit stride", lambda q: torch.ops.dit_fast.attention_fwd(
        torch.randn(2, 3, 2 * q.shape[-1])[..., ::2], 2)),
])
def test_native_op_checks_name_the_argument(match, fn):
    with pytest.raises(RuntimeError, match=match):
        fn(make_qkv(2, 3, 2, 8))


# ---- Triton ---------------------------------------------------------------------------------

TRITON_SHAPES = [(1, 1, 1, 64), (2, 7, 2, 64), (1, 65, 1, 72), (1, 130, 2, 72), (1, 33, 1, 128)]
TRITON_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (dtype, shape); under the interpreter fp32 (IEEE dots) and T >= 65 take seconds each: slow tier
TRITON_CASES = [pytest.param(dt, s, id=f"{dtype_id(dt)}-{shape_id(s)}",
                             marks=pytest.mark.slow if dt == torch.float32 or s[1] >= 65 else ())
                for s in TRITON_SHAPES for dt in TRITON_DTYPES]


def _triton_device():
    if HAS_CUDA:
        return "cuda"
    if TRITON_CPU:
        return "cpu"
    pytest.skip("needs a CUDA device or Triton's interpreter")


def _triton_fwd_bwd(qkv, H, dout, **blocks):
    """Through the dispatcher on a GPU; the kernel wrappers directly under the interpreter."""
    if qkv.is_cuda:
        with use_backend("triton"):
            y = attention_qkv(qkv, H)
            x = qkv.clone().requires_grad_()
            attention_qkv(x, H).backward(dout)
        return y, x.grad
    T = importlib.import_module("dit_fast.kernels.triton.attention")
    out, lse = T.attention_fwd(qkv, H, **blocks)
    return out, T.attention_bwd(dout, qkv, out, lse, H, **blocks)


@pytest.mark.parametrize("dtype,shape", TRITON_CASES)
def test_triton_flash_rule(dtype, shape):
    device = _triton_device()
    N, T, H, Dh = shape
    qkv = make_qkv(N, T, H, Dh, dtype, device)
    if device == "cuda":
        require(OP, "triton", "cuda", dtype, sample=A._packed(qkv, H))
    dout = make_dout(qkv, H)
    y_true, g_true = truth_fwd_bwd(qkv, H, dout)
    y_sdpa, g_sdpa = sdpa_fwd_bwd(qkv, H, dout)
    y, g = _triton_fwd_bwd(qkv, H, dout)
    assert y.shape == (N, T, H * Dh) and y.dtype == dtype and g.dtype == dtype
    check_rule("out", y, y_sdpa, y_true, dtype, max(T, Dh))
    check_rule("dqkv", g, g_sdpa, g_true, dtype, max(T, Dh))


@pytest.mark.slow
def test_triton_small_blocks_mask_partial_tiles_and_strides():
    """Blocks of 16 over T = 37 (partial last query and key tiles, several key blocks) with a
    padded-row qkv, checked against the fp64 truth; also the lse."""
    device = _triton_device()
    if device == "cuda":
        pytest.skip("block-size overrides are exercised under the interpreter")
    H, Dh, T = 2, 72, 37
    qkv = make_qkv(1, T, H, Dh + 8, torch.float32, device)[..., :3 * H * Dh]
    assert not qkv.is_contiguous()
    dout = make_dout(qkv, H)
    y_true, g_true = truth_fwd_bwd(qkv, H, dout)
    Tm = importlib.import_module("dit_fast.kernels.triton.attention")
    out, lse = Tm.attention_fwd(qkv, H, block_m=16, block_n=16)
    _, lse_true = A._fwd_reference(qkv.double(), H)
    torch.testing.assert_close(out.double(), y_true, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_true, atol=1e-5, rtol=1e-5)
    g = Tm.attention_bwd(dout, qkv, out, lse, H, block_m=16, block_n=16)
    torch.testing.assert_close(g.double(), g_true, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_triton_fp32_dot_precision_follows_torch_tf32_settings(monkeypatch):
    """fp32 attention runs "ieee" products by default and TF32 tensor cores when PyTorch allows
    TF32 for fp32 matmuls (allow_tf32, or float32 matmul precision "high" / "medium"); fp16 /
    bf16 are unaffected. Each mode within its own resolution's rule: TF32 operands keep 10
    mantissa bits (the interpreter emulates the cut), so its floor uses TF32_EPS per product."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    Tm = importlib.import_module("dit_fast.kernels.triton.attention")
    prev = torch.get_float32_matmul_precision()
    assert prev == "highest" and not torch.backends.cuda.matmul.allow_tf32  # torch's default
    assert Tm._dot_precision(torch.float32) == "ieee"
    try:
        for level, want in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(level)
            assert Tm._dot_precision(torch.float32) == want, level
    finally:
        torch.set_float32_matmul_precision(prev)

    device = _triton_device()
    N, T, H, Dh = 1, 65, 2, 72
    qkv = make_qkv(N, T, H, Dh, torch.float32, device)
    dout = make_dout(qkv, H)
    y_true, g_true = truth_fwd_bwd(qkv, H, dout)  # baselines in the default ("highest") mode
    y_sdpa, g_sdpa = sdpa_fwd_bwd(qkv, H, dout)
    errors = {}
    for mode, allow, dot_eps in (("ieee", False, FP32_EPS), ("tf32", True, TF32_EPS)):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow)
        assert Tm._dot_precision(torch.float32) == mode
        assert Tm._dot_precision(torch.bfloat16) == "tf32"  # ignored by 16-bit dots
        y, g = _triton_fwd_bwd(qkv, H, dout)
        check_rule(f"out ({mode})", y, y_sdpa, y_true, torch.float32, max(T, Dh), dot_eps=dot_eps)
        check_rule(f"dqkv ({mode})", g, g_sdpa, g_true, torch.float32, max(T, Dh), dot_eps=dot_eps)
        errors[mode] = err(y, y_true)
    monkeypatch.undo()
    assert torch.get_float32_matmul_precision() == "highest"
    # TF32 is really in effect: its error is orders of magnitude above the ieee one
    assert errors["tf32"] > 100 * errors["ieee"], errors


def test_triton_support_checks():
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    Tm = importlib.import_module("dit_fast.kernels.triton.attention")
    assert Tm.SUPPORTED_HEAD_DIMS == A._TRITON_HEAD_DIMS
    assert Tm.unsupported_reason(torch.empty(1, 1, 3 * 2 * 72, dtype=torch.float16), 2) is None
    assert "not 80" in Tm.unsupported_reason(torch.empty(1, 1, 3 * 2 * 80, dtype=torch.float16), 2)
    assert "float64" in Tm.unsupported_reason(torch.empty(1, 1, 3 * 64, dtype=torch.float64), 1)


def test_triton_aot_specs_are_well_formed():
    """Every spec names real arguments; all of a kernel's arguments are covered. (Compilation for
    sm_80 / sm_90 is tests/test_triton_aot.py's job; it cannot run under the interpreter.)"""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    Tm = importlib.import_module("dit_fast.kernels.triton.attention")
    configs = Tm.aot_configs()  # fp16, bf16 and fp32 (ieee and tf32) x 3 head dims
    assert len(configs) == 4 * 3 and len({str(c) for c in configs}) == len(configs)
    assert len(Tm.AOT_SPECS) == 3 * len(configs) + 3 * 3  # + one preprocess per dtype x head dim
    for kernel, sig, const, opts in Tm.AOT_SPECS:
        assert set(opts) <= {"num_warps", "num_stages"}
        names = kernel.arg_names
        assert set(sig) | set(const) == set(names), kernel.__name__
        assert not set(sig) & set(const)
    dims = {c["HEAD_DIM"] for _, _, c, _ in Tm.AOT_SPECS}
    assert dims == {64, 72, 128}


# ---- dispatch: forced backends, support checks, explain -------------------------------------

def test_forced_backend_that_cannot_run_raises(monkeypatch):
    # Without the interpreter, a forced triton backend refuses CPU tensors.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qkv = make_qkv(1, 3, 2, 64)
    with use_backend("triton"), pytest.raises(RuntimeError, match="runs on cuda tensors"):
        attention_qkv(qkv, 2)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="runs on cuda tensors"):
        attention_qkv(qkv, 2)
    if HAS_C:
        with use_backend("cpu"), pytest.raises(RuntimeError, match="does not support torch.float16"):
            attention_qkv(qkv.half(), 2)


def test_head_dim_and_flash_attn_reasons(monkeypatch):
    """What a CUDA machine would report: head dims outside 64/72/128 are refused by Triton (so
    `auto` falls back to the SDPA reference), flash-attn's absence is named."""
    meta = lambda hd: torch.empty(1, 4, 3, 2, hd, device="meta", dtype=torch.float16)  # noqa: E731
    assert "not 80" in A._triton_supports(meta(80))
    assert A._triton_supports(meta(72)) is None and A._triton_supports(meta(128)) is None
    assert "multiples of 8, not 36" in A._flash_supports(meta(36))
    assert A._flash_supports(meta(72)) is None
    impls = _backends._OPS[OP]
    monkeypatch.setitem(_backends._probe_cache, "triton", None)  # pretend Triton + a GPU work
    r = _backends._reject("triton", OP, impls, "cuda", torch.float16, meta(80))
    assert r is not None and "not 80" in r
    assert _backends._reject("triton", OP, impls, "cuda", torch.float16, meta(72)) is None
    if importlib.util.find_spec("flash_attn") is None:
        ex = _backends.explain(OP, torch.empty(0, dtype=torch.float16))
        assert "flash-attn is not installed" in ex["cuda"] or "cuda tensors" in ex["cuda"]
        assert "flash-attn is not installed" in A._probe_flash_attn()


# ---- torch.library / torch.compile ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_custom_ops(backend):
    require(OP, backend, "cpu")
    qkv = make_qkv(2, 5, 2, 8)
    with use_backend(backend):
        for rg in (False, True):
            torch.library.opcheck(torch.ops.dit_fast.attention.default,
                                  (qkv.clone().requires_grad_(rg), 2))
        out, lse = A._forward(qkv, 2)
        torch.library.opcheck(torch.ops.dit_fast.attention_backward.default,
                              (make_dout(qkv, 2), qkv, out, lse, 2))


@needs_c
def test_opcheck_native_op():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        torch.library.opcheck(torch.ops.dit_fast.attention_fwd.default, (make_qkv(2, 5, 2, 8, dtype), 2))


def test_torch_compile_fullgraph():
    """One opaque custom-op node, no graph break; forward and backward match the truth."""
    def f(qkv):
        return attention_qkv(qkv, 2) * 2 + 1

    qkv = make_qkv(2, 5, 2, 16)
    dout = make_dout(qkv, 2)
    y_true, g_true = truth_fwd_bwd(qkv, 2, dout)
    y, targets = compile_and_trace(f, qkv)
    assert torch.ops.dit_fast.attention.default in targets
    torch.testing.assert_close(y.double(), 2 * y_true + 1, atol=1e-5, rtol=1e-5)
    # fwd + bwd through AOT autograd (fake impls, register_autograd, the backward op)
    torch._dynamo.reset()
    x = qkv.clone().requires_grad_()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    y.backward(dout)
    torch.testing.assert_close(y.detach().double(), 2 * y_true + 1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), 2 * g_true, atol=1e-5, rtol=1e-5)


# ---- validation -----------------------------------------------------------------------------

def _bad_inputs():
    q = make_qkv(2, 3, 2, 8)
    return [
        ("qkv must be 3-D", (q[0], 2)),
        ("qkv must be 3-D", (q[None], 2)),
        ("last dim \\(47\\) must be a positive multiple of 3 \\* num_heads = 6", (q[..., :-1], 2)),
        ("last dim \\(48\\) must be a positive multiple of 3 \\* num_heads = 15", (q, 5)),
        ("num_heads must be a positive int", (q, 0)),
        ("num_heads must be a positive int", (q, 2.0)),
        ("qkv must be a floating-point", (q.long(), 2)),
        ("qkv must be a torch.Tensor", (q.tolist(), 2)),
    ]


@pytest.mark.parametrize("match,args", _bad_inputs(), ids=[f"{i}-{b[0][:20]}" for i, b in
                                                           enumerate(_bad_inputs())])
@pytest.mark.parametrize("fn", [attention_qkv, attention_ref, A.explain],
                         ids=["attention_qkv", "attention_ref", "explain"])
def test_invalid_inputs_raise_value_error(fn, match, args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_public_api_exports():
    import dit_fast.ops as ops
    assert ops.attention_qkv is attention_qkv and ops.attention_ref is attention_ref
    assert OP in _backends.registered_ops()
    assert set(_backends.registered_ops()[OP]) == {"reference", "cpu", "triton", "cuda"}
