"""Backend registry: which implementation of an op runs for a given tensor.

Backends, fastest first for `auto`:

  ``cuda``       hand-written CUDA kernels (extension ``dit_fast._C_cuda``), CUDA tensors
  ``triton``     Triton kernels, CUDA tensors (and CPU tensors under the Triton interpreter,
                 TRITON_INTERPRET=1, when forced: see below)
  ``cpu``        C++/OpenMP kernels (extension ``dit_fast._C``), CPU tensors
  ``reference``  pure PyTorch, any device (always available; every op must have one)

Choosing (`select`): ``DIT_FAST_BACKEND`` = auto | reference | cpu | triton | cuda, overridden by the
`use_backend(name)` context manager. ``auto`` takes the first backend in the order above that
(1) the op implements, (2) runs on the tensor's device, (3) supports its dtype and (4) can run on
this machine; ``reference`` always qualifies. A *forced* backend that fails any of these raises
RuntimeError with the reason, instead of silently running something else. `explain` lists the
reason each backend was rejected (the idea of xformers' dispatcher, which reports why each
attention kernel cannot serve a given input).

Ops declare what they implement with `register_op`::

    register_op("ln_modulate", {"reference": None,                 # None: any dtype
                                "cpu": (torch.float32, torch.bfloat16, torch.float64)})

An op can also refine the registry per backend (keyword arguments of `register_op`):

  ``probes={backend: fn}``    fn() -> None or a reason: whether *this op's* implementation can run on
                              this machine, replacing the backend's generic probe (attention's
                              ``cuda`` implementation is the flash-attn package, not dit_fast._C_cuda).
  ``supports={backend: fn}``  fn(tensor) -> None or a reason: a per-input check beyond device and
                              dtype (e.g. the head dim), run when `select` / `explain` get a tensor.
                              Ops with such checks are not cached by shape-blind `auto` selection.

Triton interpreter: with TRITON_INTERPRET=1 (set before any Triton kernel module is imported, as
tests/conftest.py does on machines without a GPU) the ``triton`` backend is "available
(interpreter)" and also serves CPU tensors (Triton's interpreter executes the kernels with NumPy),
but only when forced (``use_backend("triton")``): ``auto`` never picks it for CPU tensors (it is a
slow emulator meant for testing). `explain` gives auto's view by default (``forced=True``: a forced
request's).

`use_backend` is process-wide (like ``torch.nn.attention.sdpa_kernel``), not per thread, so it also
applies to backward passes that the autograd engine runs in its own threads.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

__all__ = [
    "BACKENDS", "ENV_VAR", "BackendInfo", "backends", "requested_backend", "use_backend",
    "register_op", "registered_ops", "select", "explain",
]

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "DIT_FAST_BACKEND"
_CHOICES = ("auto",) + BACKENDS
_AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
# Device types each backend's kernels run on (None: any).
_DEVICE_TYPES: dict[str, Optional[tuple[str, ...]]] = {
    "reference": None, "cpu": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",),
}

# Device types the triton backend additionally serves, when forced, under TRITON_INTERPRET=1.
_INTERPRETER_DEVICE_TYPES = ("cpu",)

DeviceLike = Union[torch.Tensor, torch.device, str]


def triton_interpreter() -> bool:
    """True when Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


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
_auto_cache: dict[tuple, str] = {}


def register_op(op_name: str,
                implementations: Union[Mapping[str, Optional[Iterable[torch.dtype]]], Iterable[str]],
                *, probes: Optional[Mapping[str, Callable[[], Optional[str]]]] = None,
                supports: Optional[Mapping[str, Callable[[torch.Tensor], Optional[str]]]] = None,
                ) -> None:
    """Declares the backends implementing `op_name` (mapping backend -> supported dtypes or None
    for any, or just an iterable of backend names). Must include "reference". Re-registering
    replaces the previous declaration. `probes` / `supports`: see the module docstring."""
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
    with _lock:
        _OPS[op_name] = impls
        _OP_PROBES[op_name] = extra["probes"]
        _OP_SUPPORTS[op_name] = extra["supports"]
        _auto_cache.clear()


def registered_ops() -> dict[str, tuple[str, ...]]:
    """{op name: backends implementing it}."""
    return {op: tuple(b for b in BACKENDS if b in impls) for op, impls in _OPS.items()}


# ---- requested backend ----------------------------------------------------------------

_override: Optional[str] = None  # set by use_backend (process-wide)


def _check_name(name: str, allow_auto: bool = True) -> str:
    choices = _CHOICES if allow_auto else BACKENDS
    if not isinstance(name, str) or name.strip().lower() not in choices:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(choices)}")
    return name.strip().lower()


def _requested() -> tuple[str, str]:
    """(backend or "auto", where the request came from)."""
    if _override is not None:
        return _override, f"use_backend({_override!r})"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if not env:
        return "auto", "default"
    if env not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {', '.join(_CHOICES)}")
    return env, f"{ENV_VAR}={env}"


def requested_backend() -> str:
    """The backend requested now: "auto" or a forced backend name."""
    return _requested()[0]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Forces backend `name` ("auto" restores automatic choice) inside the block; overrides
    DIT_FAST_BACKEND. Nestable. Process-wide (see the module docstring)."""
    global _override
    name = _check_name(name)
    with _lock:
        prev, _override = _override, name
    try:
        yield name
    finally:
        with _lock:
            _override = prev


# ---- selection ------------------------------------------------------------------------

def _device_type(t: DeviceLike) -> str:
    if isinstance(t, torch.Tensor):
        return t.device.type
    return torch.device(t).type


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
    check = _OP_SUPPORTS.get(op_name, {}).get(name)
    if check is not None and isinstance(tensor, torch.Tensor):
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
    if a forced request could run it), else why not}, in auto order. The two differ only for the
    Triton interpreter on CPU tensors."""
    impls = _impls_for(op_name, available_for_op)
    dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else None
    dev = _device_type(tensor)
    return {b: _reject(b, op_name, impls, dev, dtype, tensor, forced=forced) for b in _AUTO_ORDER}


def select(op_name: str, tensor: DeviceLike,
           available_for_op: Optional[Iterable[str]] = None) -> str:
    """The backend to run `op_name` on `tensor` (its device type and dtype decide).

    `available_for_op` optionally narrows the op's registered backends for this call. With a
    forced backend (DIT_FAST_BACKEND / use_backend) that cannot serve the call, raises
    RuntimeError naming the reason.
    """
    requested, source = _requested()
    dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else None
    dev = _device_type(tensor)
    if requested == "auto":
        key = ((op_name, dev, dtype)
               if available_for_op is None and not _OP_SUPPORTS.get(op_name) else None)
        if key is not None:
            hit = _auto_cache.get(key)
            if hit is not None:
                return hit
        impls = _impls_for(op_name, available_for_op)
        for name in _AUTO_ORDER:
            if _reject(name, op_name, impls, dev, dtype, tensor) is None:
                if key is not None:
                    _auto_cache[key] = name
                return name
        reasons = "; ".join(f"{b}: {r}" for b, r in explain(op_name, tensor, available_for_op).items())
        raise RuntimeError(f"dit_fast: no backend can run {op_name!r} on a {dev} tensor ({reasons})")
    impls = _impls_for(op_name, available_for_op)
    reason = _reject(requested, op_name, impls, dev, dtype, tensor, forced=True)
    if reason is not None:
        raise RuntimeError(f"dit_fast: backend {requested!r} was requested ({source}) for "
                           f"{op_name!r} on a {dev} {str(dtype).replace('torch.', '')} tensor, "
                           f"but it cannot run: {reason}")
    return requested


# ---- report ---------------------------------------------------------------------------

def backends(refresh: bool = False) -> dict[str, BackendInfo]:
    """{name: BackendInfo} for every backend: whether it can run here, and if not, why.
    `refresh=True` re-probes (e.g. after building the extensions in a running process)."""
    # Make sure the ops that ship with dit_fast have registered themselves.
    importlib.import_module("dit_fast.ops")
    if refresh:
        with _lock:
            _probe_cache.clear()
            _auto_cache.clear()
    ops = registered_ops()
    out = {}
    for name in BACKENDS:
        reason = _probe(name)
        note = ("interpreter" if name == "triton" and reason is None and triton_interpreter()
                and not torch.cuda.is_available() else None)
        out[name] = BackendInfo(name=name, available=reason is None, reason=reason,
                                device_types=_DEVICE_TYPES[name],
                                ops=tuple(op for op, bs in ops.items() if name in bs), note=note)
    return out
