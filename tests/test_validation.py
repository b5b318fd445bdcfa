"""Validation of kernels on first use (dit_fast._backends) and the checks behind it
(dit_fast.validation): a deliberately wrong kernel is caught with one warning, auto falls back to
the reference (op and fused model), a forced backend raises, the backward is checked when a
backward runs, DIT_FAST_VALIDATE=0 turns it off, and the selftest's op checks pass."""

import importlib
import math
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dit_fast
from dit_fast import DiT, _backends, validation
from dit_fast._backends import KernelValidationWarning, use_backend
from dit_fast.ops import ln_modulate
from dit_fast.tolerances import assert_close
from op_helpers import HAS_C, HAS_TRITON, INTERPRET, needs_c

LNM = importlib.import_module("dit_fast.ops.ln_modulate")  # the module: its kernel tables


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Validation state forgotten before and after (each test sees first uses), auto selection."""
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    monkeypatch.delenv(_backends.VALIDATE_ENV_VAR, raising=False)
    _backends.reset_validation()
    yield
    _backends.reset_validation()


def inputs(N=2, T=5, D=72, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, D, generator=g)
    mod = torch.randn(N, 6 * D, generator=g) * 0.5
    shift, scale = mod[:, :D], mod[:, D:2 * D]
    if requires_grad:
        x, shift, scale = (t.detach().clone().requires_grad_() for t in (x, shift, scale))
    return x, shift, scale


def break_forward(monkeypatch, delta=1e-2):
    good = LNM._FWD["cpu"]

    def broken(x, shift, scale, eps):
        y, mean, rstd = good(x, shift, scale, eps)
        return y + delta, mean, rstd

    monkeypatch.setitem(LNM._FWD, "cpu", broken)


def validation_warnings(record):
    return [w for w in record if issubclass(w.category, KernelValidationWarning)]


# ---- first use: the op --------------------------------------------------------------------------

@needs_c
def test_healthy_kernel_validates_once_and_serves():
    x, shift, scale = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelValidationWarning)
        ln_modulate(x, shift, scale)
        ln_modulate(x, shift, scale)
    assert _backends.select("ln_modulate", x) == "cpu"
    stats = [s for s in _backends.validation_stats() if s["op"] == "ln_modulate"]
    assert len(stats) == 1 and stats[0]["error"] is None and stats[0]["seconds"] > 0
    assert (stats[0]["backend"], stats[0]["dtype"], stats[0]["device"]) == ("cpu", "float32", "cpu")


@needs_c
def test_wrong_kernel_auto_falls_back_with_one_warning(monkeypatch):
    break_forward(monkeypatch)
    x, shift, scale = inputs()
    with use_backend("reference"):
        want = ln_modulate(x, shift, scale)
    with pytest.warns(KernelValidationWarning) as record:
        got = ln_modulate(x, shift, scale)
    (w,) = validation_warnings(record)
    msg = str(w.message)
    for part in ("'ln_modulate'", "cpu kernel", "float32", "cpu)", "max error", "tolerance"):
        assert part in msg, (part, msg)
    assert torch.equal(got, want)  # the reference backend served it
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert torch.equal(ln_modulate(x, shift, scale), want)
    assert not validation_warnings(again)  # one warning per (op, backend, dtype, device)
    assert _backends.select("ln_modulate", x) == "reference"
    assert "failed validation on first use" in _backends.explain("ln_modulate", x)["cpu"]
    assert "left out after failing validation: ln_modulate on cpu" in str(dit_fast.backends())
    # another dtype is another key: bf16 validates (and passes) on its own
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelValidationWarning)
        assert _backends.select("ln_modulate", x.bfloat16()) == "cpu"


@needs_c
def test_wrong_kernel_forced_backend_raises(monkeypatch):
    break_forward(monkeypatch)
    x, shift, scale = inputs()
    with use_backend("cpu"), pytest.raises(_backends.KernelValidationError,
                                           match=r"'cpu'.*'ln_modulate'.*failed validation"):
        ln_modulate(x, shift, scale)
    with use_backend("cpu"), pytest.raises(_backends.KernelValidationError,
                                           match="failed validation"):
        ln_modulate(x, shift, scale)  # and stays refused


@needs_c
def test_kernel_that_raises_is_left_out(monkeypatch):
    def no_image(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(LNM._FWD, "cpu", no_image)
    x, shift, scale = inputs()
    with pytest.warns(KernelValidationWarning, match="no kernel image"):
        out = ln_modulate(x, shift, scale)
    assert_close(out, LNM.ln_modulate_ref(x.double(), shift.double(), scale.double()))


@needs_c
def test_wrong_backward_is_caught_when_a_backward_runs(monkeypatch):
    """The forward's first use checks the forward; the first call from inside autograd's
    backward pass checks the backward too; the gradients then come from the reference."""
    good = LNM._BWD["cpu"]
    monkeypatch.setitem(LNM._BWD, "cpu", lambda *a: tuple(t + 1e-2 for t in good(*a)))
    x, shift, scale = inputs(requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelValidationWarning)
        y = ln_modulate(x, shift, scale)  # forward: fine
    dy = torch.randn_like(y)
    with pytest.warns(KernelValidationWarning, match="ln_modulate bwd"):
        y.backward(dy)
    got = [t.grad for t in (x, shift, scale)]
    ref = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
    with use_backend("reference"):
        ln_modulate(*ref).backward(dy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.grad, rtol=1e-5, atol=1e-5)


@needs_c
def test_validate_off_serves_the_wrong_kernel(monkeypatch):
    """DIT_FAST_VALIDATE=0: no check, the broken kernel serves (so the tests above can fail)."""
    monkeypatch.setenv(_backends.VALIDATE_ENV_VAR, "0")
    break_forward(monkeypatch)
    x, shift, scale = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelValidationWarning)
        got = ln_modulate(x, shift, scale)
    with use_backend("reference"):
        want = ln_modulate(x, shift, scale)
    assert (got - want).abs().max().item() == pytest.approx(1e-2, rel=1e-3)
    assert _backends.validation_stats() == []


@needs_c
def test_not_validated_on_fake_tensors_then_on_the_next_eager_call():
    with FakeTensorMode():
        fake = torch.empty(2, 5, 72)
        assert _backends.select("ln_modulate", fake) == "cpu"
    assert _backends.validation_stats() == []
    assert _backends.select("ln_modulate", torch.empty(2, 5, 72)) == "cpu"
    assert len(_backends.validation_stats()) == 1


def small_dit():
    torch.manual_seed(0)
    model = DiT(input_size=6, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=2,
                num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=g)
    return model.eval(), x, torch.tensor([3, 500]), torch.tensor([1, 7])


@needs_c
@pytest.mark.parametrize("validate", ["1", "0"])
def test_fused_model_with_a_wrong_kernel(monkeypatch, validate):
    """auto: the fused model equals the reference backend (fp32 tolerance of the fused path),
    with the warning naming the op; without validation the same broken kernel shows."""
    monkeypatch.setenv(_backends.VALIDATE_ENV_VAR, validate)
    model, x, t, y = small_dit()
    with torch.no_grad(), use_backend("reference"):
        want = model(x, t, y)
    break_forward(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = model(x, t, y)
    if validate == "1":
        (w,) = validation_warnings(record)
        assert "'ln_modulate'" in str(w.message)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert not validation_warnings(record)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_model_training_step_validates_every_kernel_cleanly():
    """Forward + backward of the fused model under auto: every kernel's forward and backward
    check (the backward ones run inside the custom backward ops, below autograd) passes."""
    model, x, t, y = small_dit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelValidationWarning)
        model(x, t, y).square().mean().backward()
    stats = _backends.validation_stats()
    assert all(s["error"] is None for s in stats), stats
    if HAS_C:
        checked = {(s["op"], s["grad"]) for s in stats}
        for op in ("ln_modulate", "gated_residual_ln_modulate", "attention", "patch_embed"):
            assert (op, True) in checked, (op, sorted(checked))


# ---- the checks ---------------------------------------------------------------------------------

def test_every_registered_op_has_a_validator_and_examples():
    import dit_fast.ops  # noqa: F401
    for op in _backends.registered_ops():
        assert op in _backends._OP_VALIDATE and op in _backends._OP_EXAMPLES, op


@pytest.mark.parametrize("op", ["ln_modulate", "gated_residual", "unpatchify", "timestep_embedding"])
def test_op_checks_pass(op):
    results = list(validation.op_checks("cpu", ops=[op]))
    backends = {r.backend for r in results}
    assert "reference" in backends and (("cpu" in backends) == HAS_C)
    assert all(r.ok for r in results), "\n".join(r.line() for r in results if not r.ok)


def test_op_checks_bad_arguments():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        list(validation.op_checks("cpu", ops=["nope"]))


@needs_c
def test_op_checks_report_a_wrong_kernel(monkeypatch):
    break_forward(monkeypatch)
    results = [r for r in validation.op_checks("cpu", ops=["ln_modulate"])
               if r.backend == "cpu" and r.dtype == "float32"]
    assert results and any(not r.ok and r.what.startswith("ln_modulate fwd") for r in results)
    line = next(r.line() for r in results if not r.ok)
    assert line.startswith("FAIL ln_modulate fwd (y)") and " cpu " in line


def test_check_result():
    ok = validation.CheckResult("op fwd (y)", "cpu", "float32", "2x3", 1e-6, 1e-5, 0.01)
    assert ok.ok and ok.line().startswith("PASS") and ok.to_json()["ok"] is True
    nan = validation.CheckResult("op fwd (y)", "cpu", "float32", "2x3", math.nan, 1e-5, 0.01)
    assert not nan.ok and nan.to_json()["max_err"] is None
    crashed = validation.CheckResult("op", "cpu", "float32", "2x3", math.nan, math.nan, 0.0,
                                     error="RuntimeError: boom")
    assert not crashed.ok and "error: RuntimeError: boom" in crashed.line()


def test_like_tensor_keeps_stride_order_and_gaps():
    like = torch.empty(4, 3, 8).transpose(0, 1)  # (3, 4, 8), dim 1 outermost
    t = validation.like_tensor(like, (2, 3, 8))
    assert t.shape == (2, 3, 8) and t.stride(1) > t.stride(0) > t.stride(2) == 1
    chunk = torch.empty(2, 6 * 16)[:, 16:32]  # a chunk of a wider buffer: not dense
    c = validation.like_tensor(chunk, (2, 16))
    assert c.shape == (2, 16) and c.stride(0) > 16 and c.stride(1) == 1
    dense = validation.like_tensor(torch.empty(2, 3, 8, dtype=torch.bfloat16), (1, 5, 8))
    assert dense.is_contiguous() and dense.dtype == torch.bfloat16


@needs_c
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 5), (0, 3, 4, 4), (3, 0, 4, 4)])
def test_validators_accept_degenerate_like_tensors(shape):
    """select() is also given empty probe tensors of any rank: every validator then checks a
    default shape instead of failing the kernel."""
    import dit_fast.ops  # noqa: F401
    like = torch.empty(shape)
    for op, validate in _backends._OP_VALIDATE.items():
        results = validate("cpu", like)
        assert results and all(r.ok for r in results), (op, [r.line() for r in results])


@pytest.mark.skipif(not (HAS_TRITON and (INTERPRET or torch.cuda.is_available())),
                    reason="needs triton (a GPU, or its interpreter)")
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_attention_validation_follows_the_tf32_mode(monkeypatch, allow_tf32):
    """fp32 Triton attention runs TF32 dots when torch allows TF32 (a training default): its
    first-use check must hold it to TF32's accuracy, not reject a correct kernel."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    att = importlib.import_module("dit_fast.ops.attention")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    like = torch.empty(1, 37, 3, 2, 72, device=device)
    checks = att._validate("triton", like, grad=True)
    assert [c.what.split(" (")[0] for c in checks] == ["attention fwd", "attention bwd"]
    assert all(c.ok for c in checks), [c.line() for c in checks]
