"""Kernel checks against the float64 reference: what first-use validation (dit_fast._backends) and
the selftest (dit_fast.selftest) run.

Each op registers ``validate(backend, like, grad=True, exact=False) -> list[CheckResult]`` and
``examples(device, dtype) -> list[Tensor]`` with `dit_fast._backends.register_op`. `validate` runs
`backend`'s kernels directly (no dispatch) on an input built like `like` (same last dim / head dim,
dtype, device and stride order; small unless `exact`, then `like`'s full shape), and the op's
reference kernels in float64 on the same (rounded) values as ground truth; forward, and backward
when `grad`. Exceptions propagate. The helpers below (`phase`, `run_phases`, `like_tensor`,
`row_inputs`, `row_examples`) are what the validators share.

Error and tolerance: per checked output, max_err = max |got - truth| and bound = atol + rtol *
max |truth| with (atol, rtol) from dit_fast.tolerances for the output's dtype (forward or grad
table); for reductions whose error grows with the problem (attention, GEMMs) the bound adds twice
PyTorch's own error at that dtype (`peer`). A phase reports its worst output (largest
max_err / bound). NaN fails.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import _backends, tolerances

__all__ = ["CheckResult", "op_checks", "first_use", "phase", "run_phases", "like_tensor",
           "row_inputs", "row_examples", "randn", "small_shape"]


@dataclass
class CheckResult:
    what: str            # e.g. "ln_modulate fwd (y)", "attention bwd (dqkv)"
    backend: str         # "cpu", "triton", "cuda", "reference", or "-" for model checks
    dtype: str           # "float32", "bfloat16", ...
    shape: str           # e.g. "2x256x1152" (free text)
    max_err: float       # max abs error vs the reference / ground truth (nan if it crashed)
    bound: float         # the tolerance it is held to (max_err <= bound passes; NaN fails)
    seconds: float
    error: Optional[str] = None  # exception text if the kernel/check raised

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_err <= self.bound  # NaN compares False

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        tail = f"  error: {self.error}" if self.error else ""
        return (f"{status} {self.what:34s} {self.backend:9s} {self.dtype:8s} {self.shape:18s} "
                f"err {self.max_err:.3g} tol {self.bound:.3g} {self.seconds * 1e3:8.1f} ms{tail}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        for k in ("max_err", "bound"):  # JSON has no NaN
            if not math.isfinite(d[k]):
                d[k] = None
        return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_str(t) -> str:
    return "x".join(map(str, t.shape)) if isinstance(t, Tensor) else "-"


# ---- inputs ---------------------------------------------------------------------------------

def randn(shape, like: Tensor, *, seed: int = 0, scale: float = 1.0) -> Tensor:
    """Deterministic normal values (drawn in float64 on the CPU, the same on every device), in
    `like`'s dtype and device, contiguous."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(
        device=like.device, dtype=like.dtype)


def like_tensor(like: Tensor, shape, *, seed: int = 0, scale: float = 1.0) -> Tensor:
    """Random tensor of `shape` laid out like `like`: same dtype, device and stride order, and a
    gap after each innermost row when `like` is not dense (e.g. a chunk of a wider buffer)."""
    shape = tuple(shape)
    if like.dim() != len(shape):
        return randn(shape, like, seed=seed, scale=scale)
    order = sorted(range(like.dim()), key=lambda d: like.stride(d), reverse=True)  # outer first
    dense, expect = True, 1
    for d in reversed(order):
        if like.size(d) > 1 and like.stride(d) != expect:
            dense = False
        expect *= like.size(d)
    outer = [shape[d] for d in order]
    if not dense and outer:
        outer[-1] += 1
    base = randn(outer, like, seed=seed, scale=scale)
    if not dense and outer:
        base = base[..., :shape[order[-1]]]
    inverse = [order.index(d) for d in range(len(shape))]
    return base.permute(inverse)


def small_shape(like: Tensor, exact: bool = False) -> tuple[int, ...]:
    """`like`'s shape (exact), or a small one with the same last dim: <= 2 along the first dim,
    <= 5 along the others."""
    if exact or like.dim() < 2:
        return tuple(like.shape)
    return ((max(1, min(like.shape[0], 2)),) + tuple(max(1, min(n, 5)) for n in like.shape[1:-1])
            + (like.shape[-1],))


def row_inputs(like: Tensor, n_full: int, n_params: int, exact: bool = False,
               seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs of a row op on x (N, T, D): `n_full` tensors laid out like `like` ((N, T, D); small
    (<= 2 x 5 x D) unless `exact`; (2, 5, 64) for a `like` without a row) and `n_params` (N, D) parameters read as chunks of one
    (N, (n_params + 1) * D) buffer, as DiT's blocks read their adaLN output."""
    if like.dim() != 3 or like.shape[-1] == 0:  # e.g. select() given an empty probe tensor
        like = like.new_empty(2, 5, 64)
    shape = small_shape(like, exact)
    D = shape[-1]
    full = [like_tensor(like, shape, seed=seed + i) for i in range(n_full)]
    buf = randn((shape[0], (n_params + 1) * D), like, seed=seed + n_full, scale=0.5)
    return full, list(buf[:, :n_params * D].chunk(n_params, dim=1)) if n_params else []


def row_examples(device, dtype) -> list[Tensor]:
    """`like` tensors of a row op: DiT-XL/2's x (2, 256, 1152) and an odd (1, 37, 389)."""
    return [torch.empty(2, 256, 1152, device=device, dtype=dtype),
            torch.empty(1, 37, 389, device=device, dtype=dtype)]


# ---- checks ---------------------------------------------------------------------------------

def _f64(inputs):
    return tuple(t.double() if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in inputs)


@dataclass
class _Phase:
    name: str
    fn: Callable
    inputs: tuple
    names: tuple
    kind: str
    truth: Optional[Callable]
    peer: Optional[Callable]
    tol_dtype: Optional[torch.dtype]
    floor: Optional[Callable[[float], float]]


def phase(name: str, fn: Callable, inputs: Sequence, names: Sequence[Optional[str]], *,
          kind: str = "fwd", truth: Optional[Callable] = None, peer: Optional[Callable] = None,
          tol_dtype: Optional[torch.dtype] = None,
          floor: Optional[Callable[[float], float]] = None) -> _Phase:
    """One check: ``fn(backend, *inputs)`` -> outputs (a tensor or a tuple), each named in `names`
    (None: not compared). kind: "fwd", or "grad" (run only when gradients are checked; the grad
    tolerances). truth(got) -> the float64 ground truth (default: ``fn("reference", *inputs in
    float64)``). peer() -> PyTorch's own result at the inputs' dtype (None entries: no peer): the
    bound adds twice its error. tol_dtype: the tolerance row (default: each output's dtype).
    floor(max|truth|) -> an absolute term added to the bound (e.g. TF32 products' rounding)."""
    return _Phase(name, fn, tuple(inputs), tuple(names), kind, truth, peer, tol_dtype, floor)


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def run_phases(op: str, backend: str, phases: Iterable[_Phase], grad: bool = True,
               dtype: Optional[torch.dtype] = None) -> list[CheckResult]:
    """Runs each phase on `backend` and its ground truth; one CheckResult per phase (its worst
    output), labelled with `dtype` (default: the first input's). Exceptions propagate."""
    results = []
    for ph in phases:
        if ph.kind == "grad" and not grad:
            continue
        t0 = time.perf_counter()
        got = _tuple(ph.fn(backend, *ph.inputs))
        want = _tuple(ph.truth(got) if ph.truth is not None
                      else ph.fn("reference", *_f64(ph.inputs)))
        peer = _tuple(ph.peer()) if ph.peer is not None else (None,) * len(got)
        worst = (-1.0, 0.0, 0.0, "")
        for name, g, w, p in zip(ph.names, got, want, peer):
            if name is None:
                continue
            gd, wd = g.double(), w.double()
            atol, rtol = (tolerances.GRAD if ph.kind == "grad" else tolerances.FWD)[
                ph.tol_dtype or g.dtype]
            bound = atol + rtol * _max_abs(wd)
            if p is not None:
                bound += 2 * _max_abs(p.double() - wd)
            if ph.floor is not None:
                bound += ph.floor(_max_abs(wd))
            err = float((gd - wd).abs().max()) if g.numel() else 0.0
            if g.shape != w.shape:
                err = math.nan
            ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
            if math.isnan(err) or ratio > worst[0]:
                worst = (math.inf if math.isnan(err) else ratio, err, bound, name)
        first = next((t for t in ph.inputs if isinstance(t, Tensor)), None)
        if first is not None and first.device.type == "cuda":
            torch.cuda.synchronize(first.device)
        results.append(CheckResult(
            what=f"{op} {ph.name} ({worst[3]})", backend=backend,
            dtype=_dtype_name(dtype or first.dtype) if dtype or first is not None else "-",
            shape=_shape_str(first),
            max_err=worst[1], bound=worst[2], seconds=time.perf_counter() - t0))
    return results


@contextlib.contextmanager
def _isolated(device_type: str):
    """No dispatch modes (FlopCounterMode must not count the checks), no grad, no autocast."""
    from torch.utils._python_dispatch import _disable_current_modes
    with contextlib.ExitStack() as stack:
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch.no_grad())
        if device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def first_use(validate: Callable, backend: str, like: Tensor,
              grad: bool) -> tuple[Optional[str], float]:
    """(None if `backend` passes the op's validator on an input like `like`, else the error;
    seconds it took). Called by dit_fast._backends.select on a kernel's first use."""
    t0 = time.perf_counter()
    try:
        with _isolated(like.device.type):
            checks = validate(backend, like, grad=grad)
        error = "; ".join(f"{c.what}: max error {c.max_err:.3g} > tolerance {c.bound:.3g}"
                          for c in checks if not c.ok) or None
    except Exception as e:  # noqa: BLE001 - no kernel image, out of resources, a bug, ...
        msg = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
    return error, time.perf_counter() - t0


# ---- every op x backend x dtype (the selftest) -----------------------------------------------

_ANY_DTYPE = {"cpu": (torch.float32, torch.bfloat16, torch.float64),
              "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def op_checks(device: str = "cpu", *, interpreter: bool = False,
              ops: Optional[Iterable[str]] = None) -> Iterator[CheckResult]:
    """For every registered op x every backend that can run on `device` (the Triton interpreter
    on CPU only with interpreter=True, which needs TRITON_INTERPRET=1 set before dit_fast's Triton
    kernels are imported) x every dtype that backend supports for the op: the op's validator at
    the op's example shapes (full size; small under the interpreter), forward and backward."""
    import dit_fast.ops  # noqa: F401 - registers the ops

    dev = torch.device(device)
    if interpreter and not _backends.triton_interpreter():
        raise ValueError("op_checks(interpreter=True) needs TRITON_INTERPRET=1 in the environment "
                         "before dit_fast's Triton kernels are imported")
    registered = _backends.registered_ops()
    for op in (registered if ops is None else ops):
        if op not in registered:
            raise ValueError(f"unknown op {op!r}; registered: {', '.join(registered)}")
        validate, examples = _backends._OP_VALIDATE.get(op), _backends._OP_EXAMPLES.get(op)
        if validate is None or examples is None:
            continue
        impls = _backends._OPS[op]
        for backend in registered[op]:
            interpreted = _backends._triton_interpreted(backend, dev.type)
            if interpreted and not interpreter:
                continue
            dtypes = impls[backend] or _ANY_DTYPE.get(dev.type, (torch.float32,))
            for dtype in sorted(dtypes, key=str):
                if _backends._reject(backend, op, impls, dev.type, dtype, None, forced=True):
                    continue  # cannot run here
                for like in examples(dev, dtype):
                    check = _backends._OP_SUPPORTS.get(op, {}).get(backend)
                    if check is not None and check(like) is not None:
                        continue  # e.g. a head dim this backend does not serve
                    t0 = time.perf_counter()
                    try:
                        with _isolated(dev.type):
                            results = validate(backend, like, grad=True, exact=not interpreted)
                    except Exception as e:  # noqa: BLE001 - reported as a failed check
                        results = [CheckResult(
                            what=f"{op}", backend=backend, dtype=_dtype_name(dtype),
                            shape=_shape_str(like), max_err=math.nan, bound=math.nan,
                            seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")]
                    yield from results
