"""What the op tests (tests/test_<op>.py) share: which backends can run here, the (backend, device)
pairs to test each op on, skipping with the backend registry's reason, and the checks every op
repeats (each CPU ISA path, thread-count independence, the op in a torch.compile graph)."""

import contextlib
import importlib.util

import pytest
import torch

from dit_fast import _backends
from dit_fast._backends import use_backend

HAS_CUDA = torch.cuda.is_available()
HAS_C = _backends._probe("cpu") is None
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Without a GPU, Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) runs the Triton kernels
# on CPU tensors; the registry lets a *forced* triton backend take CPU tensors then.
INTERPRET = _backends.triton_interpreter() and not HAS_CUDA

needs_c = pytest.mark.skipif(not HAS_C, reason="dit_fast._C not built")
# Marks of a test that needs a CUDA device (conftest.py also adds `gpu` to tests skipped for want of one).
GPU = (pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def backend_devices(*only: str, slow=()):
    """pytest params (backend, device of the tensors it is tested on), id "backend-device", for every
    backend (or those in `only`); the CUDA ones carry the GPU marks, the CPU ones of the backends in
    `slow` the slow mark."""
    pairs = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu" if INTERPRET else "cuda"),
             ("cuda", "cuda")] + ([("reference", "cuda")] if HAS_CUDA else [])
    return [pytest.param(b, d, id=f"{b}-{d}", marks=GPU if d == "cuda" else
                         (pytest.mark.slow,) if b in slow else ())
            for b, d in pairs if not only or b in only]


BACKEND_DEVICES = backend_devices()


def each_backend_dtype_shape(shapes, dtypes=DTYPES):
    """Parametrizes an op's accuracy test over every (backend, device), `dtypes` and `shapes`
    (ids "backend-device-dtype-shape")."""
    marks = (pytest.mark.parametrize("backend,device", BACKEND_DEVICES),
             pytest.mark.parametrize("dtype", dtypes, ids=dtype_id),
             pytest.mark.parametrize("shape", shapes, ids=shape_id))

    def apply(fn):
        for mark in marks:
            fn = mark(fn)
        return fn
    return apply


def require(op: str, backend: str, device: str, dtype: torch.dtype = torch.float32,
            sample: torch.Tensor = None, fp16_reference: bool = True) -> None:
    """Skips, with the registry's reason, unless the forced `backend` can run `op` on `sample`
    (default: an empty `dtype` tensor on `device`). A kernel that fails its first-use validation
    raises KernelValidationError: a failure, never a skip. fp16_reference=False also skips the
    reference backend on float16 (left to the GPU backends by ops checked in fp32 / bf16)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if not fp16_reference and backend == "reference" and dtype == torch.float16:
        pytest.skip("float16 is for the GPU backends; the reference is checked in fp32 / bf16")
    try:
        with use_backend(backend):
            _backends.select(op, torch.empty(0, device=device, dtype=dtype) if sample is None else sample)
    except _backends.KernelValidationError:
        raise
    except RuntimeError as e:
        pytest.skip(str(e))


def assert_auto_picks_no_interpreter(op: str, like: torch.Tensor) -> None:
    """Auto runs `op` on float32 CPU tensors like `like` with the C++ kernel (the reference without
    it), never the Triton interpreter, and on float16 ones (no CPU kernel) with the reference."""
    assert _backends.select(op, like) == ("cpu" if HAS_C else "reference")
    assert _backends.select(op, like.half()) == "reference"


def empty_row_inputs(device: str, n_tokens: int, n_rows: int, D: int = 16):
    """The empty cases (N, T) = (0, 4) and (2, 0) of a row op: yields N, T, `n_tokens` (N, T, D)
    and `n_rows` (N, D) random leaf tensors that require grad."""
    for N, T in ((0, 4), (2, 0)):
        leaf = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)  # noqa: E731
        yield N, T, [leaf(N, T, D) for _ in range(n_tokens)], [leaf(N, D) for _ in range(n_rows)]


def interpreted(backend: str, device: str) -> bool:
    """True for Triton under its (slow) interpreter: keep shapes tiny."""
    return backend == "triton" and device == "cpu"


def shape_for(backend: str, device: str, shape, small: dict):
    """`shape`, or its smaller stand-in from `small` under the interpreter (same hidden size, fewer rows)."""
    return small.get(shape, shape) if interpreted(backend, device) else shape


# opcheck's aot_dispatch test is slow: every check for one backend, and for the others the checks
# that involve their kernels (schema, fake tensors vs the real outputs).
FULL_OPCHECK_BACKEND = "cpu" if HAS_C else "reference"
QUICK_OPCHECK = ("test_schema", "test_faketensor")
ALL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_utils(backend: str):
    return ALL_OPCHECK if backend == FULL_OPCHECK_BACKEND else QUICK_OPCHECK


@contextlib.contextmanager
def each_cpu_isa():
    """`with each_cpu_isa() as isas: for isa in isas: ...` runs the body with each CPU ISA path of
    this build and CPU active in turn, then restores auto's choice (also when the body fails)."""
    from dit_fast import _C
    prev = _C.set_cpu_isa("auto")

    def isas():
        for isa in _C.supported_cpu_isas():
            _C.set_cpu_isa(isa)
            assert _C.cpu_isa() == isa
            yield isa

    try:
        yield isas()
    finally:
        _C.set_cpu_isa(prev)


def assert_thread_count_independent(run, threads=(1, 2, 3)) -> None:
    """run() returns tensors that must be bitwise the same with each torch thread count."""
    prev = torch.get_num_threads()
    outs = []
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            outs.append(tuple(run()))
    finally:
        torch.set_num_threads(prev)
    for other in outs[1:]:
        assert len(other) == len(outs[0])
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def compile_and_trace(fn, *args):
    """fn compiled with torch.compile(fullgraph=True), run on args: (its output, the set of the
    call_function targets of the traced graphs)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    return out, {n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"}


def match_cases(cases):
    """pytest params of (match, *args) cases, each with its expected-error text as id."""
    return [pytest.param(*case, id=case[0]) for case in cases]


def perturbed_dit(seed: int = 0, **config):
    """A DiT(**config) in eval mode, seeded, with every trained parameter moved off its init
    (adaLN-Zero starts at zero: every weight must matter in a test)."""
    from dit_fast import DiT
    torch.manual_seed(seed)
    m = DiT(**config).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m
