"""DiT's CPU inference Linear (dit_fast.ops.linear): every GEMM path (dit_fast's packed GEMM on each
ISA this machine runs, oneDNN's fused linear) against F.linear, the choice between them, weight
changes by every route (no cache can go stale), bf16, torch.compile and the op's autograd.

Error rule (the flash-attention rule, for a reduction): against a float64 ground truth on the same
float32 inputs, a path's max error is at most 2x torch's own float32 GEMM's plus a floor set by the
dtype at that size (tests/error_rule.py, c = 1: the random-walk rounding error of a K-term float32
sum), so the bound holds whichever GEMM and ISA either side uses (MKL sums with a smaller error than
oneDNN at K = 1000). Shapes cover
every edge of the 6 x 16 tile and of the K blocks: rows not a multiple of 6 or of the 48-row block,
columns not a multiple of 16, K = 0 / 1 / not a multiple of the 256 K block, batch 1.
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
from dit_fast.tolerances import assert_close
from error_rule import error_floor
from op_helpers import assert_thread_count_independent, needs_c

pytestmark = needs_c

SHAPES = [  # (M, K, N); DiT-sized ones in the slow tier
    (1, 7, 3), (5, 384, 17), (6, 16, 16), (67, 72, 100), (97, 257, 33),
    pytest.param(300, 1000, 1152, marks=pytest.mark.slow),
    pytest.param(2048, 384, 1152, marks=pytest.mark.slow), (49, 1536, 384), (13, 1, 5),
    (8, 384, 2311), (16, 385, 203), (17, 64, 9),  # the few-rows kernel (adaLN) and its edge
]


def _isas():
    from dit_fast import _C
    return _C.supported_cpu_isas()


@pytest.fixture(params=["dit_fast-avx2", "dit_fast-generic", "onednn"])
def gemm(request):
    """Every GEMM path this machine can run (dit_fast's on each ISA it has)."""
    from dit_fast import _C
    if request.param == "onednn":
        if lin._onednn_missing() is not None:
            pytest.skip(lin._onednn_missing())
        yield "onednn"
        return
    isa = request.param.split("-")[1]
    if isa not in _isas():
        pytest.skip(f"{isa} path not in this build / CPU")
    prev = _C.set_cpu_isa(isa)
    yield "dit_fast"
    _C.set_cpu_isa(prev)


def _check_error(got, x, w, b, gelu=False):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    mine = F.linear(x, w, b).double()
    if gelu:
        ref, mine = F.gelu(ref, approximate="tanh"), F.gelu(mine, approximate="tanh")
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    torch_err = (mine - ref).abs().max().item() if ref.numel() else 0.0
    floor = error_floor(max(ref.abs().max().item() if ref.numel() else 0.0, 1.0), torch.float32,
                        x.shape[-1], 1.0)
    assert err <= 2 * torch_err + floor, f"max error {err:.3g} > 2 x torch's {torch_err:.3g} (+{floor:.1g})"


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_gemm_paths_match_reference(gemm, M, K, N, bias, gelu):
    torch.manual_seed(M * 7 + K * 3 + N)
    x, w = torch.randn(M, K), torch.randn(N, K) / max(K, 1) ** 0.5
    b = torch.randn(N) if bias else None
    got = lin._gemm(gemm, x, w, b, gelu)
    assert got.shape == (M, N) and got.dtype == torch.float32
    _check_error(got, x, w, b, gelu)


@pytest.mark.parametrize("M,K,N", [s for s in SHAPES if not hasattr(s, "marks")])
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_operands_round_once(gemm, M, K, N, gelu):
    """dit_fast's GEMM on bf16 operands: float32 sums of the exact bf16 products, rounded to bf16
    once (at most half a bf16 ulp, 2^-8 relative, past float32's own error)."""
    if gemm != "dit_fast":
        pytest.skip("oneDNN's bf16 GEMM is checked by test_bf16_matches_reference where it runs")
    torch.manual_seed(M * 5 + K + N)
    x, w, b = (t.bfloat16() for t in (torch.randn(M, K), torch.randn(N, K) / max(K, 1) ** 0.5,
                                       torch.randn(N)))
    got = lin._gemm(gemm, x, w, b, gelu)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    ref = lin._reference(x.double(), w.double(), b.double(), gelu)
    floor = error_floor(max(ref.abs().max().item(), 1.0), torch.float32, K, 1.0)
    err = (got.double() - ref).abs()
    assert (err <= ref.abs() * 2.0 ** -8 + floor).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_matches_reference(gelu):
    """bf16 Linear: one rounding of an fp32-accurate result (the bf16 row of the tolerance table)."""
    torch.manual_seed(5)
    x, w, b = (t.bfloat16() for t in (torch.randn(3, 40, 72), torch.randn(130, 72) / 8, torch.randn(130)))
    got = lin.cpu_linear(x, w, b, gelu=gelu)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 40, 130)
    assert_close(got, lin._reference(x.double(), w.double(), b.double(), gelu))


def test_batched_input_and_threads():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 50, 72), torch.randn(130, 72), torch.randn(130)
    for gemm in ("dit_fast",) + (("onednn",) if lin._onednn_missing() is None else ()):
        got = lin._gemm(gemm, x, w, b, False)
        assert got.shape == (3, 50, 130)
        _check_error(got.reshape(150, 130), x.reshape(150, 72), w, b)
    assert_thread_count_independent(lambda: (lin.cpu_linear(x, w, b),),
                                    threads=(torch.get_num_threads(), 1))
    # a non-contiguous x is made contiguous by the wrapper
    xt = x.transpose(0, 1)
    torch.testing.assert_close(lin.cpu_linear(xt, w, b), lin.cpu_linear(xt.contiguous(), w, b),
                               rtol=0, atol=0)


def test_gelu_epilogue_is_the_gelu_kernel():
    """fc1's GELU in dit_fast's GEMM epilogue gives exactly gelu_bias applied to the GEMM + bias."""
    torch.manual_seed(1)
    x, w, b = torch.randn(70, 40), torch.randn(35, 40), torch.randn(35)
    pre = lin._gemm("dit_fast", x, w, b, False)
    fused = lin._gemm("dit_fast", x, w, b, True)
    zero = torch.zeros_like(b)
    assert torch.equal(fused, torch.ops.dit_fast.gelu_bias_fwd(pre, zero))


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_weight_changes_by_every_route(backend):
    """After a forward, each way of changing the weights gives the next forward the new weights."""
    torch.manual_seed(2)
    layer = nn.Linear(24, 40)
    x = torch.randn(64, 24)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)

    def check(mod, inp=x):
        with torch.no_grad():
            got = lin.linear(mod, inp)
            want = F.linear(inp.double(), mod.weight.double(), mod.bias.double())
        assert_close(got, want)

    with dit_fast.use_backend(backend):
        check(layer)
        layer.weight.data.copy_(torch.randn(40, 24))           # diffusers' EMAModel.copy_to
        layer.bias.data.copy_(torch.randn(40))
        check(layer)
        layer.weight.data = torch.randn(40, 24)                # EMAModel.restore-style assignment
        check(layer)
        with torch.no_grad():
            layer.weight.mul_(2)                               # in-place edit under no_grad
        check(layer)
        layer.load_state_dict({"weight": torch.randn(40, 24), "bias": torch.randn(40)})
        check(layer)
        layer(x).square().sum().backward()                     # optimizer step
        opt.step()
        check(layer)
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            twin.weight.add_(1)
        check(twin)
        check(layer)
        check(layer.to(torch.bfloat16), x.bfloat16())          # .to(): another dtype
        check(layer.float())


def test_ema_model_copy_to():
    """diffusers' EMAModel.copy_to after a forward: the next forward uses the EMA weights."""
    diffusers = pytest.importorskip("diffusers.training_utils")
    torch.manual_seed(6)
    layer = nn.Linear(24, 40)
    ema = diffusers.EMAModel(copy.deepcopy(layer).parameters())
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    x = torch.randn(64, 24)
    with torch.no_grad():
        lin.linear(layer, x)
        ema.copy_to(layer.parameters())
        got = lin.linear(layer, x)
    assert_close(got, F.linear(x.double(), layer.weight.double(), layer.bias.double()))


def test_when_the_cpu_linear_runs(monkeypatch):
    layer = nn.Linear(16, 8)
    x = torch.randn(40, 16)
    w, b = layer.weight, layer.bias
    with torch.no_grad():
        assert lin.cpu_linear_applies(x, w, b) == (lin._cpu_reason(x) is None)
        with dit_fast.use_backend("cpu"):
            assert lin.cpu_linear_applies(x, w, b)
            assert lin.cpu_linear_applies(x.bfloat16(), w.bfloat16(), b.bfloat16())
            # between FEW_ROWS and MIN_ROWS rows: torch's GEMM; up to FEW_ROWS: the few-rows kernel
            assert not lin.cpu_linear_applies(x[:lin.FEW_ROWS + 1], w, b)
            assert lin.cpu_linear_applies(x[:5], w, b) == lin._few_rows_kernel(torch.float32, False)
            assert not lin.cpu_linear_applies(x[:0], w, b)
            assert not lin.cpu_linear_applies(x.double(), w.double(), b.double())
            assert not lin.cpu_linear_applies(x, w.bfloat16(), b)  # mixed dtypes: the module's error
            monkeypatch.setenv("DIT_FAST_CPU_GEMM", "0")
            assert not lin.cpu_linear_applies(x, w, b)
            monkeypatch.delenv("DIT_FAST_CPU_GEMM")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not lin.cpu_linear_applies(x, w, b)
            with torch.utils.flop_counter.FlopCounterMode(display=False):  # FLOPs see F.linear
                assert not lin.cpu_linear_applies(x, w, b)
        with dit_fast.use_backend("reference"):
            assert not lin.cpu_linear_applies(x, w, b)
    assert not lin.cpu_linear_applies(x, w, b)                  # autograd needs torch's GEMM
    # hooks and subclasses keep the module's own forward
    calls = []
    h = layer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        lin.linear(layer, x)
    h.remove()
    assert calls == [1]


def test_paths_and_isa_are_reported():
    info = lin.cpu_isa_info()
    assert info["active"] in _isas() and info["active"] in info["summary"]
    assert ("avx2" in info["flags"]) == ("avx2" in _isas())
    paths = lin.linear_paths()
    assert set(paths) == {f"{d} linear{k}" for d in ("float32", "bfloat16")
                          for k in ("", "+gelu", f" (<= {lin.FEW_ROWS} rows)")}
    if lin._dit_isa() == "avx2" and not lin._cpu_caps().get("avx512_f"):  # measured: ours
        assert paths["float32 linear"].startswith("dit_fast in float32")
        assert paths["float32 linear+gelu"].startswith("dit_fast in float32")
    elif lin._onednn_missing() is None:
        assert paths["float32 linear"].startswith("onednn in float32")
    if lin._dit_isa() == "avx2" and not lin._cpu_caps().get("avx512_f"):  # bf16 operands, float32 sums
        assert paths["bfloat16 linear"].startswith("dit_fast in bfloat16")
        assert paths["bfloat16 linear+gelu"].startswith("dit_fast in bfloat16")
    elif not info["native_bf16"]:  # no bf16 dot products: bf16 runs the float32 GEMM
        assert "in float32" in paths["bfloat16 linear"]


def test_missing_onednn_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(lin, "_onednn_missing", lambda: "torch 9.9 has no torch.ops.mkldnn._linear_pointwise")
    gemm, _, why = lin._path(torch.float32, False)
    if lin._dit_isa() == "avx2" and not lin._cpu_caps().get("avx512_f"):
        assert gemm == "dit_fast" and lin._path(torch.float32, True)[0] == "dit_fast"  # oneDNN unused here
    else:
        assert gemm is None and "9.9" in lin._cpu_reason(torch.zeros(1))
    x, w, b = torch.randn(40, 16), torch.randn(8, 16), torch.randn(8)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        _check_error(lin.cpu_linear(x, w, b), x, w, b)


def test_forced_cpu_without_extension_raises(monkeypatch):
    monkeypatch.setattr(_backends, "_probe", lambda name: "dit_fast._C not built: test")
    x, w = torch.randn(40, 16), torch.randn(8, 16)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' was requested for 'linear'.*not built"):
            lin.cpu_linear_applies(x, w, None)


def test_op_autograd_and_opcheck():
    """dit_fast::cpu_linear: its registered autograd and fake kernel (the compiled path's op)."""
    torch.manual_seed(7)
    for gelu in (False, True):
        x, w, b = (torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
                   torch.randn(4, 6, dtype=torch.float64, requires_grad=True),
                   torch.randn(4, dtype=torch.float64, requires_grad=True))
        assert torch.autograd.gradcheck(lambda *a: lin._cpu_linear_op(*a, gelu), (x, w, b))
        xs = torch.randn(2, 40, 16)
        torch.library.opcheck(lin._cpu_linear_op, (xs, torch.randn(8, 16), torch.randn(8), gelu))
        torch.library.opcheck(lin._cpu_linear_op, (xs, torch.randn(8, 16), None, gelu))


def test_compiled_inference_keeps_the_op(monkeypatch):
    """torch.compile(fullgraph=True) of DiT's Mlp-style pair keeps dit_fast::cpu_linear."""
    torch.manual_seed(8)
    fc1, fc2 = nn.Linear(24, 96), nn.Linear(96, 24)

    def mlp(x):
        return lin.linear(fc2, linear_gelu(x, fc1.weight, fc1.bias))

    calls = []
    real = lin._run
    monkeypatch.setattr(lin, "_run", lambda x, w, b, g: calls.append(g) or real(x, w, b, g))
    x = torch.randn(2, 40, 24)
    with torch.no_grad():
        want = F.linear(F.gelu(F.linear(x.double(), fc1.weight.double(), fc1.bias.double()),
                               approximate="tanh"), fc2.weight.double(), fc2.bias.double())
        with dit_fast.use_backend("cpu"):
            got = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    assert calls == [True, False]
    assert_close(got, want)


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(40, 16), torch.randn(8, 16)
    op = torch.ops.dit_fast.linear_fwd
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        op(x, w[0], None, False)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        op(x.double(), w.double(), None, False)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        op(x, w.bfloat16(), None, False)
    with pytest.raises(RuntimeError, match=r"x's last dim \(15\) must equal weight's in_features \(16\)"):
        op(x[:, :15].contiguous(), w, None, False)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8,\)"):
        op(x, w, torch.zeros(7), False)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        op(x, w, torch.zeros(8, dtype=torch.bfloat16), False)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(16, 40).t(), w, None, False)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(x, torch.randn(16, 8).t(), None, False)


def test_linear_gelu_uses_the_epilogue_in_cpu_inference():
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 40, 24), torch.randn(96, 24), torch.randn(96)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        got = linear_gelu(x, w, b)
    assert torch.equal(got, lin.cpu_linear(x, w, b, gelu=True))
    _check_error(got.reshape(80, 96), x.reshape(80, 24), w, b, gelu=True)


def test_model_inference_runs_every_token_linear_on_the_packed_gemm(monkeypatch):
    """DiT inference on CPU float32: qkv, proj, fc1 (+GELU), fc2 and the final Linear run
    cpu_linear, so does the stacked adaLN projection (2 rows) where the few-rows kernel runs, and
    the output matches the reference backend (official math)."""
    from dit_fast import DiT
    torch.manual_seed(4)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=72, depth=2, num_heads=2,
                num_classes=10, learn_sigma=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    calls = []
    real = lin._run

    def spy(x, w, b, gelu):
        calls.append((tuple(w.shape), gelu))
        return real(x, w, b, gelu)

    monkeypatch.setattr(lin, "_run", spy)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        with dit_fast.use_backend("cpu"):
            out = model(x, t, y)
        with dit_fast.use_backend("reference"):
            ref = model(x, t, y)
    D = 72
    want = {((3 * D, D), False): 2, ((D, D), False): 2, ((4 * D, D), True): 2, ((D, 4 * D), False): 2,
            ((2 * 2 * 8, D), False): 1}
    adaln = lin._few_rows_kernel(torch.float32, False)
    if adaln:  # 2 blocks x 6 D + the final layer's 2 D
        want[((2 * 6 * D + 2 * D, D), False)] = 1
    assert {k: calls.count(k) for k in want} == want and len(calls) == 9 + adaln
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
