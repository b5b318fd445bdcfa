"""dit_fast._backends: the report, DIT_FAST_BACKEND, use_backend (threads, setter), register_op,
select (auto order table, decision cache)."""

import importlib.util
import threading

import pytest
import torch

import dit_fast
from dit_fast import _backends
from dit_fast._backends import BACKENDS, BackendInfo, backends, select, use_backend
from op_helpers import HAS_C

OP = "ln_modulate"


@pytest.fixture(autouse=True)
def _auto_env(monkeypatch):
    """Each test starts from automatic selection, whatever the caller's environment says, and
    leaves no use_backend setter behind."""
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    yield
    with _backends._lock:
        _backends._setter = None
        _backends._scopes.clear()
        _backends._update_override()


@pytest.fixture
def temp_op():
    """Registers throwaway ops (register_op's arguments) and removes them afterwards."""
    names = []

    def register(name, impls, **kwargs):
        names.append(name)
        _backends.register_op(name, impls, **kwargs)
        return name

    yield register
    for name in names:
        for table in (_backends._OPS, _backends._OP_PROBES, _backends._OP_SUPPORTS,
                      _backends._OP_SHAPE_CLASS):
            table.pop(name, None)
    _backends._decisions.clear()


# ---- backends() report ----------------------------------------------------------------------

def test_report_structure():
    report = backends()
    assert list(report) == list(BACKENDS) == ["reference", "cpu", "triton", "cuda"]
    for name, info in report.items():
        assert isinstance(info, BackendInfo) and info.name == name
        assert isinstance(info.available, bool)
        assert (info.reason is None) == info.available
        assert info.reason is None or (isinstance(info.reason, str) and info.reason)
        assert isinstance(info.ops, tuple)
        assert name in str(info)
    assert report["reference"].available and report["reference"].device_types is None
    assert report["cpu"].device_types == ("cpu",)
    assert report["cuda"].device_types == report["triton"].device_types == ("cuda",)
    # ln_modulate is registered for every backend
    for name in ("reference", "cpu", "triton", "cuda"):
        assert OP in report[name].ops


def test_report_reasons_match_this_machine():
    report = backends(refresh=True)
    assert report["cpu"].available == HAS_C
    if not HAS_C:
        assert report["cpu"].reason.startswith("dit_fast._C not built")
    if importlib.util.find_spec("triton") is None:
        assert "triton not installed" in report["triton"].reason
    if not torch.cuda.is_available():
        if _backends.triton_interpreter() and importlib.util.find_spec("triton") is not None:
            assert report["triton"].available and report["triton"].note == "interpreter"
            assert "(interpreter)" in str(report["triton"])
        elif importlib.util.find_spec("triton") is not None:
            assert "no CUDA device" in report["triton"].reason
        assert "no CUDA device" in report["cuda"].reason
        assert not report["cuda"].available


@pytest.mark.skipif(not HAS_C, reason="dit_fast._C not built")
def test_report_names_the_cpu_isa_in_use():
    """The cpu backend's entry says which of dit_fast._C's ISA paths runs (it follows set_cpu_isa)."""
    from dit_fast import _C
    prev = _C.set_cpu_isa("auto")
    try:
        for isa in _C.supported_cpu_isas():
            _C.set_cpu_isa(isa)
            note = backends()["cpu"].note
            assert note.startswith(f"{isa} kernels;") and "bf16 GEMMs" in note
            assert f"({note})" in str(backends())
    finally:
        _C.set_cpu_isa(prev)


def test_package_reexports():
    assert dit_fast.backends is backends
    assert dit_fast.use_backend is use_backend


# ---- auto selection -------------------------------------------------------------------------

def test_auto_picks_fastest_available_for_device():
    x = torch.empty(2, 3, 4)
    assert _backends.requested_backend() == "auto"
    assert select(OP, x) == ("cpu" if HAS_C else "reference")
    assert select(OP, x.to(torch.float16)) == "reference"  # no fp16 CPU kernel
    assert select(OP, torch.device("cpu")) == select(OP, "cpu") == select(OP, x)
    assert select(OP, "meta") == "reference"
    if torch.cuda.is_available():
        expected = "cuda" if backends()["cuda"].available else "reference"
        assert select(OP, torch.empty(1, device="cuda")) == expected


def test_auto_order_and_available_for_op(temp_op):
    op = temp_op("_test_all", ["reference", "cpu", "triton", "cuda"])
    x = torch.empty(1)
    assert select(op, x) == ("cpu" if HAS_C else "reference")
    assert select(op, x, available_for_op=["reference"]) == "reference"
    if torch.cuda.is_available():
        ranked = [b for b, r in _backends.explain(op, "cuda").items() if r is None]
        assert select(op, "cuda") == ranked[0]
        assert ranked[-1] == "reference"


def test_explain_lists_every_backend_with_reason(temp_op):
    op = temp_op("_test_ref_cpu", {"reference": None, "cpu": [torch.float32]})
    reasons = _backends.explain(op, torch.empty(1, dtype=torch.float64))
    assert list(reasons) == ["cpu", "reference", "cuda", "triton"]  # auto's CPU order, then the rest
    assert reasons["reference"] is None
    assert "no cuda implementation" in reasons["cuda"]
    assert "no triton implementation" in reasons["triton"]
    assert "does not support torch.float64" in reasons["cpu"]


def test_triton_interpreter_serves_cpu_tensors_only_when_forced(temp_op, monkeypatch):
    """TRITON_INTERPRET=1: a forced triton backend accepts CPU tensors (tests run the Triton
    kernels under the interpreter); auto never picks it for them."""
    pytest.importorskip("triton")
    op = temp_op("_test_interp", ["reference", "triton"])
    x = torch.empty(1)
    monkeypatch.setattr(_backends, "_decisions", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select(op, x) == "reference"
    assert "auto never picks the Triton interpreter" in _backends.explain(op, x)["triton"]
    assert _backends.explain(op, x, forced=True)["triton"] is None
    with use_backend("triton"):
        assert select(op, x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="runs on cuda tensors"):
        select(op, x)


# ---- forcing a backend ------------------------------------------------------------------------

def test_env_var(monkeypatch):
    x = torch.empty(1)
    monkeypatch.setenv("DIT_FAST_BACKEND", "reference")
    assert _backends.requested_backend() == "reference"
    assert select(OP, x) == "reference"
    monkeypatch.setenv("DIT_FAST_BACKEND", "  Auto ")
    assert _backends.requested_backend() == "auto"
    monkeypatch.setenv("DIT_FAST_BACKEND", "")
    assert _backends.requested_backend() == "auto"
    monkeypatch.setenv("DIT_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DIT_FAST_BACKEND='fastest'"):
        select(OP, x)
    monkeypatch.setenv("DIT_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"DIT_FAST_BACKEND=cuda.*runs on cuda tensors"):
        select(OP, x)
    if HAS_C:
        monkeypatch.setenv("DIT_FAST_BACKEND", "cpu")
        assert select(OP, x) == "cpu"


def test_use_backend_overrides_env_nests_and_restores(monkeypatch):
    x = torch.empty(1)
    monkeypatch.setenv("DIT_FAST_BACKEND", "cuda")
    with use_backend("reference") as name:
        assert name == "reference"
        assert _backends.requested_backend() == "reference"
        assert select(OP, x) == "reference"
        with use_backend("auto"):
            assert select(OP, x) == ("cpu" if HAS_C else "reference")
        assert _backends.requested_backend() == "reference"
    assert _backends.requested_backend() == "cuda"
    monkeypatch.delenv("DIT_FAST_BACKEND")
    with pytest.raises(KeyError):
        with use_backend("reference"):
            raise KeyError("boom")
    assert _backends.requested_backend() == "auto"


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with use_backend("gpu"):
            pass
    assert _backends.requested_backend() == "auto"


def test_forced_backend_errors_name_the_reason(temp_op):
    x = torch.empty(1)
    cpu_only = temp_op("_test_ref_cpu_only", ["reference", "cpu"])
    with use_backend("triton"), pytest.raises(RuntimeError, match="no triton implementation"):
        select(cpu_only, x)
    with use_backend("cuda"), pytest.raises(RuntimeError, match=r"use_backend\('cuda'\)"):
        select(OP, x)
    op = temp_op("_test_cpu_f32", {"reference": None, "cpu": [torch.float32]})
    with use_backend("cpu"), pytest.raises(RuntimeError, match="does not support torch.bfloat16"):
        select(op, x.bfloat16())
    with use_backend("cpu"), pytest.raises(RuntimeError, match="has no cpu implementation"):
        select(op, x, available_for_op=["reference"])


def test_forced_unavailable_backend_reports_probe_reason(monkeypatch):
    monkeypatch.setitem(_backends._probe_cache, "cpu", "dit_fast._C not built: simulated")
    monkeypatch.setattr(_backends, "_decisions", {})
    with use_backend("cpu"), pytest.raises(RuntimeError, match="dit_fast._C not built: simulated"):
        select(OP, torch.empty(1))
    assert select(OP, torch.empty(1)) == "reference"
    assert not backends()["cpu"].available


# ---- registry ----------------------------------------------------------------------------------

def test_register_op_validation(temp_op):
    with pytest.raises(ValueError, match="must have a 'reference' implementation"):
        temp_op("_test_no_ref", ["cpu"])
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        temp_op("_test_bad", ["reference", "opencl"])
    with pytest.raises(ValueError, match="unknown op '_test_missing'"):
        select("_test_missing", torch.empty(1))
    temp_op("_test_ok", ("reference", "cuda"))
    assert _backends.registered_ops()["_test_ok"] == ("reference", "cuda")
    assert _backends.registered_ops()[OP] == ("reference", "cpu", "triton", "cuda")


def _small_only(calls):
    """A `supports` check that records the shapes it was given and accepts last dims up to 4."""
    def check(t):
        calls.append(tuple(t.shape))
        return None if t.shape[-1] <= 4 else f"last dim {t.shape[-1]} > 4"
    return check


def test_op_specific_probes_and_supports(temp_op):
    """`probes` replace a backend's machine probe for one op; `supports` add per-input checks
    (given a tensor), and ops with such checks are not cached by shape-blind auto selection."""
    calls = []
    small_only = _small_only(calls)
    name = temp_op("_test_probes_supports", {"reference": None, "cpu": None},
                   probes={"cpu": lambda: None}, supports={"cpu": small_only})
    # the op probe replaces the cpu probe: available even without dit_fast._C
    assert select(name, torch.empty(2, 3)) == "cpu"
    assert select(name, torch.empty(2, 8)) == "reference"
    assert select(name, torch.empty(2, 3)) == "cpu"
    assert calls == [(2, 3), (2, 8), (2, 3)]
    assert _backends.explain(name, torch.empty(2, 8))["cpu"] == "last dim 8 > 4"
    assert _backends.explain(name, "cpu")["cpu"] is None  # no tensor: no input check
    with use_backend("cpu"), pytest.raises(RuntimeError, match="last dim 8 > 4"):
        select(name, torch.empty(2, 8))
    _backends.register_op(name, {"reference": None, "cpu": None},
                          probes={"cpu": lambda: "simulated: no library"})
    assert _backends.explain(name, torch.empty(1))["cpu"] == "simulated: no library"
    assert select(name, torch.empty(1)) == "reference"
    with pytest.raises(ValueError, match="has no triton implementation"):
        _backends.register_op(name, ["reference", "cpu"], supports={"triton": small_only})
    with pytest.raises(ValueError, match="must be callable"):
        _backends.register_op(name, ["reference", "cpu"], probes={"cpu": "yes"})


def test_decisions_cached_per_shape_class(temp_op):
    """With `shape_class`, the input checks run once per (device, dtype, shape class); other
    shapes of the same class hit the cache."""
    calls = []
    name = temp_op("_test_shape_class", {"reference": None, "cpu": None},
                   probes={"cpu": lambda: None}, supports={"cpu": _small_only(calls)},
                   shape_class=lambda t: t.shape[-1])
    assert [select(name, torch.empty(*s)) for s in ((2, 3), (5, 3), (2, 8), (7, 8), (2, 3))] \
        == ["cpu", "cpu", "reference", "reference", "cpu"]
    assert calls == [(2, 3), (2, 8)]
    select(name, torch.empty(2, 3, dtype=torch.float64))  # another dtype: decided afresh
    assert calls[-1] == (2, 3) and len(calls) == 3
    with use_backend("cpu"):  # forced requests are cached too, and still raise when refused
        select(name, torch.empty(1, 3))
        with pytest.raises(RuntimeError, match="last dim 8 > 4"):
            select(name, torch.empty(1, 8))


# ---- the auto order table ------------------------------------------------------------------------

def test_auto_order_table_prefers_triton_for_cuda_row_ops():
    for op in ("ln_modulate", "gated_residual_ln_modulate", "gated_residual", "gelu_bias"):
        assert _backends.auto_order(op, "cuda") == ("triton", "cuda", "reference")
        assert list(_backends.explain(op, "cuda"))[:3] == ["triton", "cuda", "reference"]
    assert _backends.auto_order("attention", "cuda")[0] == "cuda"  # flash-attn first
    assert _backends.auto_order("patch_embed", "cuda") == ("cuda", "triton", "reference")
    assert _backends.auto_order(OP, "cpu") == ("cpu", "reference")
    assert _backends.auto_order(OP, "mps") == ("reference",)
    for per_dev in _backends.AUTO_ORDER.values():
        assert all(order[-1] == "reference" for order in per_dev.values())


def test_set_auto_order_rewrites_the_table(monkeypatch, temp_op):
    monkeypatch.setattr(_backends, "AUTO_ORDER", {d: dict(v) for d, v in _backends.AUTO_ORDER.items()})
    name = temp_op("_test_order", {"reference": None, "cpu": None}, probes={"cpu": lambda: None})
    assert select(name, torch.empty(1)) == "cpu"
    _backends.set_auto_order("cpu", ["reference"], op_name=name)
    assert select(name, torch.empty(1)) == "reference"  # the cached decision was dropped
    assert "not in auto's order for cpu tensors" in _backends.explain(name, torch.empty(1))["cpu"]
    assert select(OP, torch.empty(1)) == ("cpu" if HAS_C else "reference")  # other ops keep theirs
    with use_backend("cpu"):  # a forced backend does not depend on the order
        assert select(name, torch.empty(1)) == "cpu"
    with pytest.raises(ValueError, match="ending in 'reference'"):
        _backends.set_auto_order("cuda", ["triton", "cuda"])
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        _backends.set_auto_order("cuda", ["tpu", "reference"])
    _backends.set_auto_order("xpu", ["reference"])  # a device type without an entry yet
    assert _backends.auto_order(OP, "xpu") == ("reference",)


# ---- use_backend: threads, the setter form, the report ------------------------------------------

def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_overlapping_scopes_in_two_threads_end_on_auto():
    """A enters reference, B enters cpu, A exits, B exits: back on auto (and every step in
    between is the most recently entered open scope)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with use_backend("reference"):
            a_in.set()
            b_in.wait(5)
            seen["a_after_b_entered"] = _backends.requested_backend()
        a_out.set()

    def thread_b():
        a_in.wait(5)
        with use_backend("cpu"):
            b_in.set()
            a_out.wait(5)
            seen["b_after_a_exited"] = _backends.requested_backend()

    threads = [threading.Thread(target=f) for f in (thread_a, thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a_after_b_entered": "cpu", "b_after_a_exited": "cpu"}
    assert _backends.requested_backend() == "auto" and not _backends._scopes
    assert select(OP, torch.empty(1)) == ("cpu" if HAS_C else "reference")


def test_scope_is_seen_by_other_threads_and_backward():
    """Process-wide: another thread (e.g. autograd's backward threads) sees an open scope."""
    with use_backend("reference"):
        assert _in_thread(_backends.requested_backend) == "reference"
        x = torch.randn(2, 3, 8, requires_grad=True)
        seen = []
        x.register_hook(lambda g: seen.append(_backends.requested_backend()))
        (x * 2).sum().backward()
        assert seen == ["reference"]
    assert _in_thread(_backends.requested_backend) == "auto"


def test_use_backend_without_with_is_a_setter(monkeypatch):
    x = torch.empty(1)
    use_backend("reference")
    assert _backends.requested_backend() == "reference" and select(OP, x) == "reference"
    assert _in_thread(_backends.requested_backend) == "reference"
    with use_backend("auto"):  # a scope over the setter
        assert select(OP, x) == ("cpu" if HAS_C else "reference")
    assert _backends.requested_backend() == "reference"
    monkeypatch.setenv(_backends.ENV_VAR, "cuda")
    assert _backends.requested_backend() == "reference"  # the setter overrides the env var
    use_backend("auto")
    assert _backends.requested_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        use_backend("gpu")  # a bogus name raises even without `with`
    assert _backends.requested_backend() == "auto"


def test_backends_prints_as_a_table():
    report = backends()
    assert isinstance(report, dict) and report["cpu"].name == "cpu"
    text = str(report)
    assert repr(report) == text
    lines = text.splitlines()
    assert lines[0].split() == ["backend", "tensors", "ops", "status"]
    assert [ln.split()[0] for ln in lines[1:5]] == list(BACKENDS)
    assert "all " in lines[1] and "available" in lines[1]
    if not HAS_C:
        assert "unavailable: dit_fast._C not built" in lines[2]
