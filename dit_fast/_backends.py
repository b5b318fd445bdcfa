"""Backend registry: which implementation of an op runs for a given tensor.

Backends:

  ``cuda``       hand-written CUDA kernels (extension ``dit_fast._C_cuda``), CUDA tensors
  ``triton``     Triton kernels, CUDA tensors (and CPU tensors under the Triton interpreter,
                 TRITON_INTERPRET=1, when forced: see below)
  ``cpu``        C++/OpenMP kernels (extension ``dit_fast._C``), CPU tensors
  ``reference``  pure PyTorch, any device (always available; every op must have one)

Choosing (`select`): ``DIT_FAST_BACKEND`` = auto | reference | cpu | triton | cuda, overridden by
`use_backend(name)`. ``auto`` takes the first backend in `AUTO_ORDER` (per device type and op, see
there) that (1) the op implements, (2) runs on the tensor's device, (3) supports its dtype, (4) can
run on this machine, (5) passes the op's `supports` check for the input and (6) passed validation
on first use (below); ``reference`` always qualifies. A *forced* backend that fails any of these
raises RuntimeError with the reason, instead of silently running something else. `explain` lists
the reason each backend was rejected (the idea of xformers' dispatcher, which reports why each
attention kernel cannot serve a given input).

Ops declare what they implement with `register_op`::

    register_op("ln_modulate", {"reference": None,                 # None: any dtype
                                "cpu": (torch.float32, torch.bfloat16, torch.float64)},
                validate=_validate, examples=_examples)

An op can also refine the registry per backend (keyword arguments of `register_op`):

  ``probes={backend: fn}``    fn() -> None or a reason: whether *this op's* implementation can run on
                              this machine, replacing the backend's generic probe (attention's
                              ``cuda`` implementation is the flash-attn package, not dit_fast._C_cuda).
  ``supports={backend: fn}``  fn(tensor) -> None or a reason: a per-input check beyond device and
                              dtype (e.g. the head dim), run when `select` / `explain` get a tensor.
  ``shape_class=fn``          fn(tensor) -> hashable: the part of the input that the `supports`
                              checks read (attention: the head dim). Decisions are cached per
                              (op, requested backend, device, dtype, shape class); an op with
                              `supports` but no `shape_class` is selected afresh on every call.
  ``validate=fn``, ``examples=fn``: the op's kernel check (dit_fast.validation).

Decision cache (per call site and shape class): every op calls `select` with its own op name, so
the cache key's op name identifies the call site; the rest of the key is everything the decision
reads. A hit costs one dict lookup. The cache is cleared whenever an input of the decision changes
(register_op, set_auto_order, a validation failure, backends(refresh=True)).

Validation on first use: before a non-reference backend first serves an (op, dtype, device) in
this process, `select` runs the op's validator (dit_fast.validation) on a small input built like
the real one (same last dim / head dim, dtype, device, stride order) against the op's float64
reference, with the tolerances of dit_fast.tolerances: the forward on the first forward call, the
backward too on the first call made from inside autograd's backward pass (gradients needed). If
the kernel raises or misses the tolerance, ONE `KernelValidationWarning` names the op, backend,
dtype, device and error, and that backend is left out for that op, dtype and device for the rest
of the process: ``auto`` falls back to the next backend in its order, a *forced* backend raises
RuntimeError instead. It never runs while torch.compile traces or a CUDA graph captures (nor on
fake / meta tensors): those calls are served without it and it runs on the next eager call (the
warm-up that graph capture and compiled code get first). ``DIT_FAST_VALIDATE=0`` turns it off.
`validation_stats()` gives its one-time cost per key.

Triton interpreter: with TRITON_INTERPRET=1 (set before any Triton kernel module is imported, as
tests/conftest.py does on machines without a GPU) the ``triton`` backend is "available
(interpreter)" and also serves CPU tensors (Triton's interpreter executes the kernels with NumPy),
but only when forced (``use_backend("triton")``): ``auto`` never picks it for CPU tensors (it is a
slow emulator meant for testing). `explain` gives auto's view by default (``forced=True``: a forced
request's).

`use_backend` is process-wide, not per thread: the autograd engine runs backward passes in its own
threads, which do not inherit thread-locals, and a backward must see the backend its scope asked
for. Scopes may overlap across threads: each ``with use_backend(...)`` block pushes its own entry on
one process-wide stack and removes exactly that entry when it exits, whatever the order of exits;
the most recently entered open scope wins, and when all scopes have exited the process is back on
the setter value / DIT_FAST_BACKEND / auto. Called without ``with``, ``use_backend(name)`` is a
setter (like ``torch.set_grad_enabled``): it sets the process-wide backend under any open scopes
until the next setter call (``use_backend("auto")`` restores automatic choice). A bogus name
raises ValueError either way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Optional, Union

import torch

__all__ = [
    "BACKENDS", "ENV_VAR", "VALIDATE_ENV_VAR", "AUTO_ORDER", "BackendInfo", "BackendReport",
    "KernelValidationWarning", "KernelValidationError", "backends", "requested_backend",
    "use_backend", "register_op", "registered_ops", "select", "explain", "auto_order", "set_auto_order", "validation_stats",
]

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "DIT_FAST_BACKEND"
VALIDATE_ENV_VAR = "DIT_FAST_VALIDATE"
_CHOICES = ("auto",) + BACKENDS
# Device types each backend's kernels run on (None: any).
_DEVICE_TYPES: dict[str, Optional[tuple[str, ...]]] = {
    "reference": None, "cpu": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",),
}

# Device types the triton backend additionally serves, when forced, under TRITON_INTERPRET=1.
_INTERPRETER_DEVICE_TYPES = ("cpu",)

# ``auto``'s preference, best first: {tensor device type: {op name, or "*" for every other op:
# backends}}; "*" as the device type covers every other device (meta, mps, ...). A backend that
# cannot serve a call is skipped, and every order ends in "reference". This is the one table a
# measurement rewrites (`set_auto_order`, e.g. from bench/gpu_check.sh's row-op bandwidth).
#
# CUDA row ops (ln_modulate, gated_residual[_ln_modulate], gelu_bias): Triton first, unmeasured.
# Both now read 16-byte vectors (the review's P3/P4 flaws in the .cu kernels are fixed), so reading
# the compiled code does not rank them; the Triton kernels' code has executed (under the
# interpreter, against the references) while the .cu kernels have only compiled. Attention keeps
# ``cuda`` (the flash-attn package) first. The other ops keep the .cu kernels first. Notes and
# instruction counts: docs/backends.md.
_ROW_OPS = ("ln_modulate", "gated_residual_ln_modulate", "gated_residual", "gelu_bias")
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {"*": ("cuda", "triton", "reference"),
             **{op: ("triton", "cuda", "reference") for op in _ROW_OPS}},
    "cpu": {"*": ("cpu", "reference")},  # the Triton interpreter only when forced
    "*": {"*": ("reference",)},
}

DeviceLike = Union[torch.Tensor, torch.device, str]


def triton_interpreter() -> bool:
    """True when Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


class KernelValidationWarning(RuntimeWarning):
    """A backend's kernel failed validation on first use; auto left it out for that op."""


class KernelValidationError(RuntimeError):
    """A forced backend's kernel failed validation on first use."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool                        # can run on this machine
    reason: Optional[str]                  # why not (None when available)
    device_types: Optional[tuple[str, ...]]  # tensor device types it serves (None: any)
    ops: tuple[str, ...]                   # registered ops that implement it
    note: Optional[str] = None             # e.g. "interpreter" for Triton under TRITON_INTERPRET=1

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        if self.available and self.note:
            state += f" ({self.note})"
        return f"{self.name}: {state}; ops: {', '.join(self.ops) or '-'}"


class BackendReport(dict):
    """{name: BackendInfo} (what `backends()` returns); prints as a table."""

    def __str__(self) -> str:
        all_ops = registered_ops()
        rows = [("backend", "tensors", "ops", "status")]
        for info in self.values():
            state = "available" if info.available else f"unavailable: {info.reason}"
            if info.available and info.note:
                state += f" ({info.note})"
            missing = [op for op in all_ops if op not in info.ops]
            ops = (f"all {len(all_ops)}" if not missing else
                   f"{len(info.ops)} of {len(all_ops)} (not {', '.join(missing)})")
            rows.append((info.name, "/".join(info.device_types or ("any",)), ops, state))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        failed = validation_stats(failed_only=True)
        for s in failed:
            lines.append(f"left out after failing validation: {s['op']} on {s['backend']} "
                         f"({s['dtype']}, {s['device']}): {s['error']}")
        return "\n".join(lines)

    __repr__ = __str__


# ---- availability probes (cached) ------------------------------------------------------

_lock = threading.Lock()
_probe_cache: dict[str, Optional[str]] = {}


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except ImportError as e:  # not built, or built against another torch
        return str(e) or type(e).__name__
    return None


def _probe_cpu() -> Optional[str]:
    err = _import_error("dit_fast._C")
    return None if err is None else f"dit_fast._C not built: {err}"


def _no_cuda_device() -> Optional[str]:
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"no CUDA device (torch {torch.__version__} is a CPU-only build)"
    return "no CUDA device"


def _probe_triton() -> Optional[str]:
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton not installed")
    else:
        err = _import_error("triton")
        if err is not None:
            reasons.append(f"triton not importable: {err}")
    no_dev = _no_cuda_device()
    if no_dev and not triton_interpreter():  # the interpreter runs without a GPU
        reasons.append(no_dev)
    return "; ".join(reasons) or None


def _probe_cuda() -> Optional[str]:
    reasons = []
    no_dev = _no_cuda_device()
    if no_dev:
        reasons.append(no_dev)
    cpu_err = _probe("cpu")
    if cpu_err:  # dit_fast._C defines the op schemas that _C_cuda implements
        reasons.append(f"dit_fast._C_cuda needs {cpu_err}")
    else:
        err = _import_error("dit_fast._C_cuda")
        if err is not None:
            reasons.append(f"dit_fast._C_cuda not built: {err}")
    return "; ".join(reasons) or None


_PROBES = {"reference": lambda: None, "cpu": _probe_cpu, "triton": _probe_triton,
           "cuda": _probe_cuda}


def _probe(name: str) -> Optional[str]:
    """None if backend `name` can run on this machine, else the reason. Cached."""
    try:
        return _probe_cache[name]
    except KeyError:
        pass
    reason = _PROBES[name]()
    with _lock:
        _probe_cache.setdefault(name, reason)
    return _probe_cache[name]


# ---- op registry ----------------------------------------------------------------------

# op name -> {backend: frozenset of dtypes, or None for any dtype}
_OPS: dict[str, dict[str, Optional[frozenset]]] = {}
# op name -> {backend: op-specific availability probe () -> reason}; {backend: input check}
_OP_PROBES: dict[str, dict[str, Callable[[], Optional[str]]]] = {}
_OP_SUPPORTS: dict[str, dict[str, Callable[[torch.Tensor], Optional[str]]]] = {}
# op name -> shape-class function, None (no input checks: shape-blind), or _UNCACHED
_OP_SHAPE_CLASS: dict[str, object] = {}
# op name -> validate(backend, like, grad=...) / examples(device, dtype) (dit_fast.validation)
_OP_VALIDATE: dict[str, Callable] = {}
_OP_EXAMPLES: dict[str, Callable] = {}
_UNCACHED = object()
_decisions: dict[tuple, str] = {}  # decision cache (see the module docstring)


def register_op(op_name: str,
                implementations: Union[Mapping[str, Optional[Iterable[torch.dtype]]], Iterable[str]],
                *, probes: Optional[Mapping[str, Callable[[], Optional[str]]]] = None,
                supports: Optional[Mapping[str, Callable[[torch.Tensor], Optional[str]]]] = None,
                shape_class: Optional[Callable[[torch.Tensor], Hashable]] = None,
                validate: Optional[Callable] = None,
                examples: Optional[Callable] = None) -> None:
    """Declares the backends implementing `op_name` (mapping backend -> supported dtypes or None
    for any, or just an iterable of backend names). Must include "reference". Re-registering
    replaces the previous declaration. Keyword arguments: see the module docstring."""
    if not isinstance(implementations, Mapping):
        implementations = {name: None for name in implementations}
    impls = {}
    for name, dtypes in implementations.items():
        _check_name(name, allow_auto=False)
        impls[name] = None if dtypes is None else frozenset(dtypes)
    if "reference" not in impls:
        raise ValueError(f"op {op_name!r} must have a 'reference' implementation")
    extra = {}
    for kind, fns in (("probes", probes), ("supports", supports)):
        extra[kind] = dict(fns or {})
        for name, fn in extra[kind].items():
            if _check_name(name, allow_auto=False) not in impls:
                raise ValueError(f"{kind}[{name!r}] given for op {op_name!r}, which has no {name} "
                                 f"implementation")
            if not callable(fn):
                raise ValueError(f"{kind}[{name!r}] for op {op_name!r} must be callable")
    for kind, fn in (("shape_class", shape_class), ("validate", validate), ("examples", examples)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{kind} for op {op_name!r} must be callable")
    with _lock:
        _OPS[op_name] = impls
        _OP_PROBES[op_name] = extra["probes"]
        _OP_SUPPORTS[op_name] = extra["supports"]
        _OP_SHAPE_CLASS[op_name] = (shape_class if shape_class is not None
                                    else _UNCACHED if extra["supports"] else None)
        for table, fn in ((_OP_VALIDATE, validate), (_OP_EXAMPLES, examples)):
            if fn is None:
                table.pop(op_name, None)
            else:
                table[op_name] = fn
        _decisions.clear()


def registered_ops() -> dict[str, tuple[str, ...]]:
    """{op name: backends implementing it}."""
    return {op: tuple(b for b in BACKENDS if b in impls) for op, impls in _OPS.items()}


# ---- auto order -----------------------------------------------------------------------

def auto_order(op_name: str, device_type: str) -> tuple[str, ...]:
    """auto's preference for `op_name` on `device_type` tensors, best first (from AUTO_ORDER)."""
    per_dev = AUTO_ORDER.get(device_type) or AUTO_ORDER["*"]
    return per_dev.get(op_name) or per_dev["*"]


def set_auto_order(device_type: str, order: Iterable[str], op_name: str = "*") -> None:
    """Rewrites auto's preference for `op_name` ("*": every op without its own entry) on
    `device_type` tensors ("*": devices without their own entry). `order` must end in
    "reference". Meant for a measurement (e.g. the GPU check's bandwidth runs)."""
    order = tuple(_check_name(b, allow_auto=False) for b in order)
    if not order or order[-1] != "reference" or len(set(order)) != len(order):
        raise ValueError(f"auto order {order} must list distinct backends ending in 'reference'")
    with _lock:
        AUTO_ORDER.setdefault(device_type, {"*": auto_order("*", device_type)})[op_name] = order
        _decisions.clear()


# ---- requested backend ----------------------------------------------------------------

# use_backend state (process-wide, see the module docstring): the setter's (token, name), the open
# scopes [(token, name), ...] in entry order, and the resulting override (None: DIT_FAST_BACKEND).
_setter: Optional[tuple[object, str]] = None
_scopes: list[tuple[object, str]] = []
_override: Optional[str] = None


def _update_override() -> None:  # callers hold _lock
    global _override
    _override = _scopes[-1][1] if _scopes else (_setter[1] if _setter else None)


def _check_name(name: str, allow_auto: bool = True) -> str:
    choices = _CHOICES if allow_auto else BACKENDS
    if not isinstance(name, str) or name.strip().lower() not in choices:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(choices)}")
    return name.strip().lower()


def _env_backend() -> str:
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if not env:
        return "auto"
    if env not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {', '.join(_CHOICES)}")
    return env


def _source(requested: str) -> str:
    if _override is not None:
        return f"use_backend({_override!r})"
    return "default" if requested == "auto" else f"{ENV_VAR}={requested}"


def requested_backend() -> str:
    """The backend requested now: "auto" or a forced backend name."""
    override = _override
    return override if override is not None else _env_backend()


class use_backend:
    """``with use_backend(name): ...`` forces backend `name` inside the block ("auto" restores
    automatic choice), overriding DIT_FAST_BACKEND; nestable, and correct when scopes in several
    threads overlap. Without ``with``, ``use_backend(name)`` sets the backend until the next such
    call. Process-wide (see the module docstring). Unknown names raise ValueError."""

    def __init__(self, name: str):
        global _setter
        self.name = _check_name(name)
        self._token = object()
        with _lock:  # the setter form; __enter__ turns it into a scope
            self._prev_setter, _setter = _setter, (self._token, self.name)
            _update_override()

    def __enter__(self) -> str:
        global _setter
        with _lock:
            if _setter is not None and _setter[0] is self._token:
                _setter = self._prev_setter
            _scopes.append((self._token, self.name))
            _update_override()
        return self.name

    def __exit__(self, *exc) -> bool:
        with _lock:
            for i in range(len(_scopes) - 1, -1, -1):
                if _scopes[i][0] is self._token:
                    del _scopes[i]
                    break
            _update_override()
        return False

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


# ---- selection ------------------------------------------------------------------------

def _device_type(t: DeviceLike) -> str:
    if isinstance(t, torch.Tensor):
        return t.device.type
    return torch.device(t).type


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    """True inside autograd's backward pass (a call there needs the backward validated)."""
    return _graph_task_id() != -1


def _triton_interpreted(name: str, device_type: str) -> bool:
    """True if the triton backend would run on `device_type` tensors through Triton's interpreter
    (TRITON_INTERPRET=1), which only a forced request gets."""
    return (name == "triton" and device_type in _INTERPRETER_DEVICE_TYPES
            and triton_interpreter())


def _reject(name: str, op_name: str, impls: Mapping[str, Optional[frozenset]], device_type: str,
            dtype: Optional[torch.dtype], tensor: Optional[DeviceLike] = None,
            forced: bool = False) -> Optional[str]:
    """None if backend `name` can serve this call, else why not."""
    if name not in impls:
        have = ", ".join(b for b in BACKENDS if b in impls)
        return f"op {op_name!r} has no {name} implementation (it has: {have})"
    devs = _DEVICE_TYPES[name]
    interpreted = _triton_interpreted(name, device_type)
    if interpreted and not forced:  # the interpreter is for tests: only a forced request
        return (f"the {name} backend runs on {'/'.join(devs)} tensors, not {device_type} "
                f"(auto never picks the Triton interpreter for {device_type} tensors; force "
                f"it with use_backend('triton'))")
    if devs is not None and device_type not in devs and not interpreted:
        return f"the {name} backend runs on {'/'.join(devs)} tensors, not {device_type}"
    dtypes = impls[name]
    if dtypes is not None and dtype is not None and dtype not in dtypes:
        have = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"the {name} implementation of {op_name!r} does not support {dtype} (supports: {have})"
    if interpreted:  # Triton's interpreter needs no GPU
        reason = None if importlib.util.find_spec("triton") is not None else "triton not installed"
    else:
        op_probe = _OP_PROBES.get(op_name, {}).get(name)
        reason = op_probe() if op_probe is not None else _probe(name)
    if reason is not None:
        return reason
    if isinstance(tensor, torch.Tensor):
        failed = _failed.get((op_name, name, tensor.dtype, str(tensor.device)))
        if failed is not None:
            return f"failed validation on first use: {failed}"
        check = _OP_SUPPORTS.get(op_name, {}).get(name)
        if check is not None:
            return check(tensor)
    return None


def _impls_for(op_name: str, available_for_op: Optional[Iterable[str]]):
    try:
        impls = _OPS[op_name]
    except KeyError:
        raise ValueError(f"unknown op {op_name!r}: register it with register_op()") from None
    if available_for_op is not None:
        keep = {_check_name(b, allow_auto=False) for b in available_for_op}
        impls = {b: d for b, d in impls.items() if b in keep}
    return impls


def explain(op_name: str, tensor: DeviceLike,
            available_for_op: Optional[Iterable[str]] = None,
            forced: bool = False) -> dict[str, Optional[str]]:
    """{backend: None if ``auto`` could pick it to serve `op_name` for `tensor` (with forced=True:
    if a forced request could run it), else why not}: auto's order for the tensor's device first,
    then the backends outside it. The two views differ only for the Triton interpreter on CPU
    tensors."""
    impls = _impls_for(op_name, available_for_op)
    dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else None
    dev = _device_type(tensor)
    order = auto_order(op_name, dev)
    out = {b: _reject(b, op_name, impls, dev, dtype, tensor, forced=forced) for b in order}
    for b in BACKENDS[::-1]:  # outside auto's order for this device: say why
        if b not in out:
            reason = _reject(b, op_name, impls, dev, dtype, tensor, forced=forced)
            out[b] = reason if reason is not None or forced else (
                f"not in auto's order for {dev} tensors (dit_fast._backends.AUTO_ORDER)")
    return out


def _decision_key(op_name: str, requested: str, tensor: DeviceLike) -> Optional[tuple]:
    if not isinstance(tensor, torch.Tensor):
        return (op_name, requested, _device_type(tensor), None, None, False)
    shape_class = _OP_SHAPE_CLASS.get(op_name)
    if shape_class is _UNCACHED:
        return None
    return (op_name, requested, tensor.device, tensor.dtype,
            None if shape_class is None else shape_class(tensor), _in_backward())


def select(op_name: str, tensor: DeviceLike,
           available_for_op: Optional[Iterable[str]] = None) -> str:
    """The backend to run `op_name` on `tensor` (its device, dtype and, for ops with input checks,
    its shape class decide), validating a non-reference backend's kernel on its first use (see
    the module docstring).

    `available_for_op` optionally narrows the op's registered backends for this call. With a
    forced backend (DIT_FAST_BACKEND / use_backend) that cannot serve the call, raises
    RuntimeError naming the reason.
    """
    override = _override
    requested = override if override is not None else _env_backend()
    key = _decision_key(op_name, requested, tensor) if available_for_op is None else None
    if key is not None:
        hit = _decisions.get(key)
        if hit is not None:
            return hit
    name, cacheable = _select(op_name, tensor, requested, available_for_op)
    if key is not None and cacheable:
        _decisions[key] = name
    return name


def _select(op_name, tensor, requested, available_for_op) -> tuple[str, bool]:
    """(backend, whether the decision may be cached)."""
    impls = _impls_for(op_name, available_for_op)
    dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else None
    dev = _device_type(tensor)
    if requested == "auto":
        for name in auto_order(op_name, dev):
            if _reject(name, op_name, impls, dev, dtype, tensor) is None:
                status = _validated(op_name, name, tensor, forced=False)
                if status is not _FAILED:
                    return name, status is _OK
        reasons = "; ".join(f"{b}: {r}" for b, r in explain(op_name, tensor, available_for_op).items())
        raise RuntimeError(f"dit_fast: no backend can run {op_name!r} on a {dev} tensor ({reasons})")
    reason = _reject(requested, op_name, impls, dev, dtype, tensor, forced=True)
    if reason is not None:
        failed = (isinstance(tensor, torch.Tensor)
                  and (op_name, requested, dtype, str(tensor.device)) in _failed)
        raise (KernelValidationError if failed else RuntimeError)(f"dit_fast: backend {requested!r} was requested ({_source(requested)}) "
                           f"for {op_name!r} on a {dev} {str(dtype).replace('torch.', '')} tensor, "
                           f"but it cannot run: {reason}")
    # (the interpreter's decision reads TRITON_INTERPRET, which the cache key does not hold)
    return requested, (_validated(op_name, requested, tensor, forced=True) is _OK
                       and not _triton_interpreted(requested, dev))


# ---- validation on first use ------------------------------------------------------------

_OK, _SKIPPED, _FAILED = object(), object(), object()
_validation_lock = threading.RLock()
_levels: dict[tuple, int] = {}         # (op, backend, dtype, device) -> 1 fwd / 2 fwd+bwd passed
_failed: dict[tuple, str] = {}         # (op, backend, dtype, device) -> error
_stats: list[dict] = []                # one entry per validation run


def _validation_enabled() -> bool:
    return os.environ.get(VALIDATE_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _can_validate_now(t: torch.Tensor) -> bool:
    """Not while torch.compile traces or a CUDA graph captures, nor on fake / meta tensors."""
    if torch.compiler.is_compiling() or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if t.device.type == "meta":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _validated(op_name: str, name: str, tensor: DeviceLike, forced: bool):
    """_OK (validated, or nothing to validate), _SKIPPED (cannot validate now: serve, do not
    cache) or _FAILED (auto only: a forced backend raises)."""
    validate = _OP_VALIDATE.get(op_name)
    if (name == "reference" or validate is None or not isinstance(tensor, torch.Tensor)
            or not _validation_enabled()):
        return _OK
    vkey = (op_name, name, tensor.dtype, str(tensor.device))
    need = 2 if _in_backward() else 1
    if _failed.get(vkey) is None and _levels.get(vkey, 0) >= need:
        return _OK
    if _failed.get(vkey) is None and not _can_validate_now(tensor):
        return _SKIPPED
    with _validation_lock:
        if _failed.get(vkey) is None and _levels.get(vkey, 0) < need:
            from .validation import first_use  # imports this module: import here
            error, seconds = first_use(validate, name, tensor, grad=need == 2)
            _stats.append({"op": op_name, "backend": name, "dtype": str(tensor.dtype)
                           .replace("torch.", ""), "device": str(tensor.device),
                           "grad": need == 2, "seconds": seconds, "error": error})
            if error is None:
                _levels[vkey] = need
            else:
                _failed[vkey] = error
                _decisions.clear()
                if not forced:
                    warnings.warn(
                        f"dit_fast: the {name} kernel of {op_name!r} failed validation on first "
                        f"use ({str(tensor.dtype).replace('torch.', '')}, {tensor.device}): "
                        f"{error}. auto leaves {name} out for {op_name!r} in this process and "
                        f"falls back to the next backend.", KernelValidationWarning, stacklevel=4)
        error = _failed.get(vkey)
    if error is None:
        return _OK
    if forced:
        raise KernelValidationError(
                           f"dit_fast: backend {name!r} was requested ({_source(name)}) for "
                           f"{op_name!r} on {tensor.device} {str(tensor.dtype).replace('torch.', '')}"
                           f" tensors, but its kernel failed validation on first use: {error}")
    return _FAILED


def validation_stats(failed_only: bool = False) -> list[dict]:
    """One dict per first-use validation run in this process: op, backend, dtype, device, grad
    (whether the backward was checked), seconds (its one-time cost) and error (None: passed)."""
    return [dict(s) for s in _stats if s["error"] is not None or not failed_only]


def reset_validation() -> None:
    """Forgets every validation result (the next use of each kernel validates again)."""
    with _validation_lock, _lock:
        _levels.clear()
        _failed.clear()
        _stats.clear()
        _decisions.clear()


# ---- report ---------------------------------------------------------------------------

def backends(refresh: bool = False) -> BackendReport:
    """{name: BackendInfo} for every backend: whether it can run here, and if not, why; prints as
    a table. `refresh=True` re-probes (e.g. after building the extensions in a running process)."""
    # Make sure the ops that ship with dit_fast have registered themselves.
    importlib.import_module("dit_fast.ops")
    if refresh:
        with _lock:
            _probe_cache.clear()
            _decisions.clear()
    ops = registered_ops()
    out = BackendReport()
    for name in BACKENDS:
        reason = _probe(name)
        note = ("interpreter" if name == "triton" and reason is None and triton_interpreter()
                and not torch.cuda.is_available() else None)
        if name == "cpu" and reason is None:  # which of dit_fast._C's ISA paths runs, and bf16
            from .ops.linear import cpu_isa_info
            isa = cpu_isa_info()
            note = (f"{isa['active']} kernels; bf16 GEMMs "
                    f"{'native (oneDNN)' if isa['native_bf16'] else 'in float32 math'}")
        out[name] = BackendInfo(name=name, available=reason is None, reason=reason,
                                device_types=_DEVICE_TYPES[name],
                                ops=tuple(op for op, bs in ops.items() if name in bs), note=note)
    return out
