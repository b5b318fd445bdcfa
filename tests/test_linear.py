"""The packed-weight CPU GEMM (dit_fast.ops.linear, csrc/cpu/gemm.cpp) against F.linear.

Error rule (the flash-attention rule, for a reduction): against a float64 ground truth on the same
float32 inputs, the packed GEMM's max error is at most 2x torch's own float32 GEMM's plus a floor
set by fp32's resolution at that K (tests/error_rule.py), so the bound holds however accurate the
CPU's MKL is. Shapes cover every edge of the 6 x 16 tile and of the K blocks:
rows not a multiple of 6 or of the 48-row block, columns not a multiple of 16, K = 0 / 1 / not a
multiple of the 256 K block, batch 1.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dit_fast
from dit_fast import _backends
from dit_fast.ops import linear as lin
from dit_fast.ops.gelu import linear_gelu
from error_rule import error_floor

pytestmark = pytest.mark.skipif(_backends._probe("cpu") is not None,
                                reason=f"cpu backend unavailable: {_backends._probe('cpu')}")

SHAPES = [  # (M, K, N)
    (1, 7, 3), (5, 384, 17), (6, 16, 16), (67, 72, 100), (97, 257, 33),
    (300, 1000, 1152), (2048, 384, 1152), (49, 1536, 384), (13, 1, 5),
]


def _isas():
    from dit_fast import _C
    return _C.supported_cpu_isas()


@pytest.fixture(params=["avx2", "generic"])
def isa(request):
    from dit_fast import _C
    if request.param not in _isas():
        pytest.skip(f"{request.param} path not in this build / CPU")
    prev = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)


def _check_error(got, x, w, b, gelu=False):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    mine = F.linear(x, w, b).double()
    if gelu:
        ref, mine = F.gelu(ref, approximate="tanh"), F.gelu(mine, approximate="tanh")
    err = (got.double() - ref).abs().max().item()
    torch_err = (mine - ref).abs().max().item()
    # c = 0.5: the packed GEMM alone reached 0.23x (K = 257), measured on AVX2
    floor = error_floor(ref.abs().max().item(), torch.float32, x.shape[-1], 0.5)
    assert err <= 2 * torch_err + floor, f"max error {err:.3g} > 2 x torch's {torch_err:.3g} (+{floor:.1g})"


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_linear_matches_reference(isa, M, K, N, bias, gelu):
    torch.manual_seed(M * 7 + K * 3 + N)
    x, w = torch.randn(M, K), torch.randn(N, K) / max(K, 1) ** 0.5
    b = torch.randn(N) if bias else None
    got = lin.packed_linear(x, w, b, gelu=gelu)
    assert got.shape == (M, N) and got.dtype == torch.float32
    _check_error(got, x, w, b, gelu)


def test_packed_linear_batched_input_and_threads():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 50, 72), torch.randn(130, 72), torch.randn(130)
    got = lin.packed_linear(x, w, b)
    assert got.shape == (3, 50, 130)
    _check_error(got.reshape(150, 130), x.reshape(150, 72), w, b)
    prev = torch.get_num_threads()
    try:  # results do not depend on the thread count
        torch.set_num_threads(1)
        one = lin.packed_linear(x, w, b)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, got)
    # a non-contiguous x is made contiguous by the wrapper
    xt = x.transpose(0, 1)
    torch.testing.assert_close(lin.packed_linear(xt, w, b), lin.packed_linear(xt.contiguous(), w, b),
                               rtol=0, atol=0)


def test_gelu_epilogue_is_the_gelu_kernel():
    """fc1's GELU in the GEMM epilogue gives exactly gelu_bias applied to the GEMM + bias."""
    torch.manual_seed(1)
    x, w, b = torch.randn(70, 40), torch.randn(35, 40), torch.randn(35)
    pre = lin.packed_linear(x, w, b)
    fused = lin.packed_linear(x, w, b, gelu=True)
    zero = torch.zeros_like(b)
    assert torch.equal(fused, torch.ops.dit_fast.gelu_bias_fwd(pre, zero))


def test_weight_cache_follows_in_place_updates():
    torch.manual_seed(2)
    layer = nn.Linear(24, 40)
    x = torch.randn(64, 24)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        a = lin.linear(layer, x)
        torch.testing.assert_close(a, layer(x))
        layer.weight.mul_(2)          # optimizer-style in-place update: _version changes
        torch.testing.assert_close(lin.linear(layer, x), layer(x))
        layer.load_state_dict({"weight": torch.randn(40, 24), "bias": torch.randn(40)})
        torch.testing.assert_close(lin.linear(layer, x), layer(x))
        twin = copy.deepcopy(layer)   # a different tensor: its own packed copy
        twin.weight.add_(1)
        torch.testing.assert_close(lin.linear(twin, x), twin(x))
        torch.testing.assert_close(lin.linear(layer, x), layer(x))
        # writes through .data bypass the version counter: clear_packed_weights() resyncs
        layer.weight.data.copy_(torch.randn(40, 24))
        lin.clear_packed_weights()
        torch.testing.assert_close(lin.linear(layer, x), layer(x))
        lin.linear(twin, x)
    n = len(lin._PACKED)
    del twin
    assert len(lin._PACKED) == n - 1  # entries die with their weight


def test_when_the_packed_gemm_runs(monkeypatch):
    layer = nn.Linear(16, 8)
    x = torch.randn(40, 16)
    w, b = layer.weight, layer.bias
    with torch.no_grad():
        assert lin.packed_gemm_applies(x, w, b) == (lin._avx2_reason(x) is None)
        with dit_fast.use_backend("cpu"):
            assert lin.packed_gemm_applies(x, w, b)              # forced: either ISA
            assert not lin.packed_gemm_applies(x[:5], w, b)      # too few rows
            assert not lin.packed_gemm_applies(x.double(), w.double(), b.double())
            monkeypatch.setenv("DIT_FAST_CPU_GEMM", "0")
            assert not lin.packed_gemm_applies(x, w, b)
            monkeypatch.delenv("DIT_FAST_CPU_GEMM")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not lin.packed_gemm_applies(x, w, b)
        with dit_fast.use_backend("reference"):
            assert not lin.packed_gemm_applies(x, w, b)
    assert not lin.packed_gemm_applies(x, w, b)                  # autograd needs torch's GEMM
    # hooks and subclasses keep the module's own forward
    calls = []
    h = layer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        lin.linear(layer, x)
    h.remove()
    assert calls == [1]


def test_forced_cpu_without_extension_raises(monkeypatch):
    monkeypatch.setattr(_backends, "_probe", lambda name: "dit_fast._C not built: test")
    x, w = torch.randn(40, 16), torch.randn(8, 16)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' was requested for 'linear'.*not built"):
            lin.packed_gemm_applies(x, w, None)


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(40, 16), torch.randn(8, 16)
    p = torch.ops.dit_fast.linear_pack(w)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        torch.ops.dit_fast.linear_pack(w[0])
    with pytest.raises(RuntimeError, match="weight must be float32"):
        torch.ops.dit_fast.linear_pack(w.double())
    with pytest.raises(RuntimeError, match="packed must be linear_pack"):
        torch.ops.dit_fast.linear_packed(x, p, None, 17, False)
    with pytest.raises(RuntimeError, match="packed must be linear_pack"):
        torch.ops.dit_fast.linear_packed(x[:, :15].contiguous(), p, None, 8, False)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8,\)"):
        torch.ops.dit_fast.linear_packed(x, p, torch.zeros(7), 8, False)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.dit_fast.linear_packed(torch.randn(16, 40).t(), p, None, 8, False)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.dit_fast.linear_packed(x.double(), p, None, 8, False)


def test_linear_gelu_uses_the_epilogue_in_cpu_inference():
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 40, 24), torch.randn(96, 24), torch.randn(96)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        got = linear_gelu(x, w, b)
    assert torch.equal(got, lin.packed_linear(x, w, b, gelu=True))
    _check_error(got.reshape(80, 96), x.reshape(80, 24), w, b, gelu=True)


def test_model_inference_runs_every_token_linear_on_the_packed_gemm(monkeypatch):
    """DiT inference on CPU float32: qkv, proj, fc1 (+GELU), fc2 and the final Linear run the
    packed GEMM, and the output matches the reference backend (official math)."""
    from dit_fast import DiT
    torch.manual_seed(4)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=72, depth=2, num_heads=2,
                num_classes=10, learn_sigma=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    calls = []
    real = lin.packed_linear

    def spy(x, w, b=None, gelu=False):
        calls.append((tuple(w.shape), gelu))
        return real(x, w, b, gelu)

    monkeypatch.setattr(lin, "packed_linear", spy)
    monkeypatch.setattr("dit_fast.ops.gelu.packed_linear", spy)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        with dit_fast.use_backend("cpu"):
            out = model(x, t, y)
        with dit_fast.use_backend("reference"):
            ref = model(x, t, y)
    D = 72
    want = {((3 * D, D), False): 2, ((D, D), False): 2, ((4 * D, D), True): 2, ((D, 4 * D), False): 2,
            ((2 * 2 * 8, D), False): 1}
    assert {k: calls.count(k) for k in want} == want and len(calls) == 9
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
