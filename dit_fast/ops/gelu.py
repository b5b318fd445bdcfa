"""GELU (tanh approximation, exactly ``nn.GELU(approximate="tanh")``) fused with the preceding bias
add, and the DiT MLP's ``fc1 -> GELU`` built on it.

    gelu_bias(h, bias)             = gelu_tanh(h + bias)                h (..., F), bias (F,)
    linear_gelu(x, weight, bias)   = gelu_tanh(x @ weight.T + bias)     x (..., K), weight (F, K)

`linear_gelu` runs the GEMM without bias (``F.linear(x, weight)``) and then the fused bias + GELU
epilogue; in eager inference the epilogue overwrites the GEMM output in place (no extra (..., F)
buffer), and the triton backend runs a single Triton GEMM with the bias + GELU epilogue
(dit_fast/kernels/triton/gelu.py). With autograd (and under torch.compile) it is F.linear + the
``dit_fast::gelu_bias`` op, keeping the pre-activation for the backward as nn.GELU does. The
reference backend (eager) runs the official expression ``F.gelu(F.linear(x, w, b))``.

Public API: `gelu_bias`, `linear_gelu` and the references `gelu_bias_ref`, `linear_gelu_ref`.
Structure as dit_fast.ops.ln_modulate: custom op ``dit_fast::gelu_bias`` (fake impl, registered
autograd through ``dit_fast::gelu_bias_backward`` -> (dh, dbias)), backend chosen at run time.
Backends: reference (PyTorch), cpu / cuda (C++ ops ``torch.ops.dit_fast.gelu_bias_fwd``,
``gelu_bias_fwd_`` (in place, returns nothing), ``gelu_bias_bwd``), triton (dit_fast/kernels/triton/gelu.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backends, nvtx, validation
from ._eager import eager_inference
from .linear import cpu_linear, cpu_linear_applies

__all__ = ["gelu_bias", "gelu_bias_ref", "linear_gelu", "linear_gelu_ref", "OP_NAME"]

OP_NAME = "gelu_bias"

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: forward, in-place forward (linear_gelu's epilogue)
    and backward, on h (..., F) built like `like`."""
    if like.dim() < 2 or like.shape[-1] == 0:  # e.g. select() given an empty probe tensor
        like = like.new_empty(2, 5, 64)
    shape = validation.small_shape(like, exact)
    h, dout = (validation.like_tensor(like, shape, seed=i) for i in range(2))
    bias = validation.randn(shape[-1:], like, seed=2, scale=0.5)
    return validation.run_phases(OP_NAME, backend, [
        validation.phase("fwd", lambda b, h, bias: _FWD[b](h, bias), (h, bias), ("out",)),
        validation.phase("fwd inplace",
                         lambda b, h, bias: _FWD_INPLACE[b](h.contiguous().clone(), bias),
                         (h, bias), ("out",)),
        validation.phase("bwd", lambda b, *a: _BWD[b](*a), (dout, h, bias), ("dh", "dbias"),
                         kind="grad"),
    ], grad)


def _examples(device, dtype):
    """DiT-XL/2's fc1 output (2, 256, 4608) and an odd (1, 37, 389)."""
    return [torch.empty(2, 256, 4608, device=device, dtype=dtype),
            torch.empty(1, 37, 389, device=device, dtype=dtype)]


_backends.register_op(OP_NAME, {"reference": None, "cpu": _CPU_DTYPES, "triton": _TRITON_DTYPES,
                                "cuda": _CUDA_DTYPES}, validate=_validate, examples=_examples)


def gelu_bias_ref(h: Tensor, bias: Tensor) -> Tensor:
    """Reference: ``F.gelu(h + bias, approximate="tanh")``."""
    return F.gelu(h + bias, approximate="tanh")


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Reference: ``F.gelu(F.linear(x, weight, bias), approximate="tanh")`` (DiT's fc1 + act)."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


# ---- input validation -----------------------------------------------------------------------

def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_gelu_inputs(op: str, h: Tensor, bias: Tensor, h_name: str = "h") -> None:
    _check_tensor(op, h_name, h)
    _check_tensor(op, "bias", bias)
    if h.dim() < 1:
        raise ValueError(f"{op}: {h_name} must have at least one dimension (..., F), got a scalar")
    if not h.is_floating_point():
        raise ValueError(f"{op}: {h_name} must be a floating-point tensor, got {h.dtype}")
    Fdim = h.shape[-1]
    if bias.dim() != 1 or bias.shape[0] != Fdim:
        raise ValueError(f"{op}: bias must have shape (F,) = ({Fdim},) to match {h_name} of shape "
                         f"{tuple(h.shape)}, got {tuple(bias.shape)}")
    if bias.dtype != h.dtype:
        raise ValueError(f"{op}: bias must have the same dtype as {h_name} ({h.dtype}), "
                         f"got {bias.dtype}")
    if bias.device != h.device:
        raise ValueError(f"{op}: bias must be on the same device as {h_name} ({h.device}), "
                         f"got {bias.device}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- backend kernels: (h, bias) -> out; in place (h, bias) -> h; (dout, h, bias) -> (dh, dbias)

def _fwd_reference(h, bias):
    acc = _acc(h.dtype)
    return F.gelu(h.to(acc) + bias.to(acc), approximate="tanh").to(h.dtype)


def _fwd_reference_inplace(h, bias):
    return h.copy_(_fwd_reference(h, bias))


def _bwd_reference(dout, h, bias):
    acc = _acc(h.dtype)
    dh = torch.ops.aten.gelu_backward(dout.to(acc), h.to(acc) + bias.to(acc), approximate="tanh")
    dbias = dh.sum(tuple(range(dh.dim() - 1))) if dh.dim() > 1 else dh.clone()
    return dh.to(h.dtype), dbias.to(h.dtype)


def _fwd_native(h, bias):
    return torch.ops.dit_fast.gelu_bias_fwd(h.contiguous(), bias.contiguous())


def _fwd_native_inplace(h, bias):
    torch.ops.dit_fast.gelu_bias_fwd_(h, bias.contiguous())
    return h


def _bwd_native(dout, h, bias):
    return torch.ops.dit_fast.gelu_bias_bwd(dout.contiguous(), h.contiguous(), bias.contiguous())


def _triton():
    from ..kernels.triton import gelu as k
    return k


_FWD: dict[str, Callable] = {
    "reference": _fwd_reference, "cpu": _fwd_native, "cuda": _fwd_native,
    "triton": lambda h, b: _triton().gelu_bias_fwd(h, b)}
_FWD_INPLACE: dict[str, Callable] = {  # h must be contiguous
    "reference": _fwd_reference_inplace, "cpu": _fwd_native_inplace, "cuda": _fwd_native_inplace,
    "triton": lambda h, b: _triton().gelu_bias_fwd(h, b, out=h)}
_BWD: dict[str, Callable] = {
    "reference": _bwd_reference, "cpu": _bwd_native, "cuda": _bwd_native,
    "triton": lambda *a: _triton().gelu_bias_bwd(*a)}


def _forward(h, bias):
    return _FWD[_backends.select(OP_NAME, h)](h, bias)


# ---- custom ops -----------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::gelu_bias", mutates_args=())
def _gelu_bias_op(h: Tensor, bias: Tensor) -> Tensor:
    return _forward(h, bias)


@_gelu_bias_op.register_fake
def _(h, bias):
    return h.new_empty(h.shape)


@torch.library.custom_op("dit_fast::gelu_bias_backward", mutates_args=())
def _gelu_bias_backward_op(dout: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return _BWD[_backends.select(OP_NAME, h)](dout, h, bias)


@_gelu_bias_backward_op.register_fake
def _(dout, h, bias):
    return h.new_empty(h.shape), h.new_empty((h.shape[-1],))


def _setup_context(ctx, inputs, output):
    h, bias = inputs
    ctx.save_for_backward(h, bias)


def _backward(ctx, dout):
    h, bias = ctx.saved_tensors
    dh, dbias = _gelu_bias_backward_op(dout, h, bias)
    return dh, dbias


_gelu_bias_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """Fake (meta) kernels for the C++ ops, so they can be traced / opcheck'ed directly too."""
    if _backends._probe("cpu") is not None:  # dit_fast._C not built: the ops do not exist
        return

    @torch.library.register_fake("dit_fast::gelu_bias_fwd")
    def _(h, bias):
        return h.new_empty(h.shape)

    @torch.library.register_fake("dit_fast::gelu_bias_fwd_")
    def _(h, bias):
        return None

    @torch.library.register_fake("dit_fast::gelu_bias_bwd")
    def _(dout, h, bias):
        return h.new_empty(h.shape), h.new_empty((h.shape[-1],))


_register_native_fakes()


# ---- public API -----------------------------------------------------------------------------

@nvtx.annotate("dit_fast.gelu_bias")
def gelu_bias(h: Tensor, bias: Tensor) -> Tensor:
    """``gelu_tanh(h + bias)`` = ``F.gelu(h + bias, approximate="tanh")``.

    h: (..., F) floating point; bias: (F,), same dtype/device. Returns a new tensor of h's shape and
    dtype. Differentiable w.r.t. h and bias (first order); works under torch.compile(fullgraph=True).
    Raises ValueError for malformed inputs.
    """
    _check_gelu_inputs("gelu_bias", h, bias)
    if eager_inference(h, bias):
        return _forward(h, bias)
    return _gelu_bias_op(h, bias)


@nvtx.annotate("dit_fast.linear_gelu")
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu_tanh(x @ weight.T + bias)``: DiT's ``mlp.act(mlp.fc1(x))`` with
    weight = fc1.weight (F, K), bias = fc1.bias (F,), x (..., K); returns (..., F) in x's dtype.

    The GEMM runs without bias (``F.linear(x, weight)``), then the fused bias + GELU epilogue of
    the selected backend; in eager inference the epilogue works in place on the GEMM output (a
    forced triton backend: one GEMM kernel with the epilogue; the cpu backend on float32: the
    GEMM of dit_fast.ops.linear with bias + GELU as its epilogue). The reference backend (eager) computes the
    official ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``, bit for bit. Under autocast
    the float32 operands are cast to the autocast dtype first (as autocast does for F.linear).
    Differentiable w.r.t. x, weight and bias; torch.compile(fullgraph=True)-friendly. Raises
    ValueError for malformed inputs.
    """
    op = "linear_gelu"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        _check_tensor(op, name, t)
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor (..., K), got "
                         f"{x.dtype} of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (F, K) with K = {x.shape[-1]} (x's last "
                         f"dimension), got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have the same dtype as x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on the same device as x ({x.device}), "
                             f"got {t.device}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: bias must have shape (F,) = ({weight.shape[0]},) to match weight, "
                         f"got {tuple(bias.shape)}")
    x, weight, bias = _autocast_inputs(x, weight, bias)
    if not torch.compiler.is_compiling():
        backend = _backends.select(OP_NAME, x)
        if backend == "reference":  # the official fc1 + GELU expression (PyTorch autograd)
            return linear_gelu_ref(x, weight, bias)
        if eager_inference(x, weight, bias):
            # One Triton kernel (GEMM + bias + GELU epilogue) only when triton is forced: its
            # untuned GEMM has not been measured against cuBLAS, so `auto` keeps cuBLAS + the
            # in-place Triton epilogue.
            if backend == "triton" and _backends.requested_backend() == "triton":
                return _triton().linear_gelu_fwd(x, weight, bias)
            if backend == "cpu" and cpu_linear_applies(x, weight, bias, gelu=True):
                return cpu_linear(x, weight, bias, gelu=True)  # GELU in the GEMM's epilogue
            h = F.linear(x, weight).contiguous()  # (..., F)
            return _FWD_INPLACE[backend](h, bias)
    elif cpu_linear_applies(x, weight, bias, gelu=True):  # compiled CPU inference: the same op (ops.linear)
        return cpu_linear(x, weight, bias, gelu=True)
    return _gelu_bias_op(F.linear(x, weight), bias)


def _autocast_inputs(x: Tensor, weight: Tensor, bias: Tensor):
    """Under autocast, the float32 operands cast to the autocast dtype, as autocast casts
    ``F.linear``'s (so the GEMM and the epilogue see one dtype, and the result is what
    ``act(fc1(x))`` gives under autocast)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.dtype == torch.float32 else t for t in (x, weight, bias))
