"""Fused LayerNorm (no affine) + adaLN modulation: DiT's ``modulate(norm(x), shift, scale)``.

    y = LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]
    x: (N, T, D); shift, scale: (N, D); LayerNorm over D without weight/bias, biased variance.

Public API: `ln_modulate` (dispatches to a backend, see dit_fast._backends) and `ln_modulate_ref`
(the plain PyTorch expression, the ground truth for tests).

Structure (the pattern later ops follow):
  * ``dit_fast::ln_modulate`` / ``dit_fast::ln_modulate_backward`` are `torch.library.custom_op`s
    returning (y, mean, rstd) and (dx, dshift, dscale). Each picks its backend at run time with
    `_backends.select`, so `torch.compile(fullgraph=True)` traces them as single opaque nodes
    (fake impls give the output metadata) and autograd goes through `register_autograd`.
  * Backend kernels: ``reference`` (PyTorch, fp32/fp64 math), ``cpu`` and ``cuda`` (the C++ ops
    ``torch.ops.dit_fast.ln_modulate_fwd/bwd`` from dit_fast._C / dit_fast._C_cuda; the dispatcher
    routes by device), ``triton`` (dit_fast/kernels/triton/ln_modulate.py; fp32/bf16/fp16, imported
    on first use). mean/rstd are float32 (float64 for float64 inputs) for every backend, so a
    forward from one backend can be differentiated by another.
  * Eager inference (no grad needed, not compiling) skips the custom-op/autograd layers and calls
    the backend kernel directly.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backends, nvtx, validation
from ._eager import eager_inference

__all__ = ["ln_modulate", "ln_modulate_ref", "DEFAULT_EPS", "OP_NAME"]

OP_NAME = "ln_modulate"
DEFAULT_EPS = 1e-6

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: forward (y, mean, rstd) and backward."""
    (x, dy), (shift, scale) = validation.row_inputs(like, 2, 2, exact)
    fwd = lambda b, x, sh, sc: _FWD[b](x, sh, sc, DEFAULT_EPS)  # noqa: E731
    return validation.run_phases(OP_NAME, backend, [
        validation.phase("fwd", fwd, (x, shift, scale), ("y", "mean", "rstd")),
        validation.phase("bwd", lambda b, x, sh, sc, dy: _BWD[b](dy, x, sc, *fwd(b, x, sh, sc)[1:]),
                         (x, shift, scale, dy), ("dx", "dshift", "dscale"), kind="grad"),
    ], grad)


_backends.register_op(OP_NAME, {"reference": None, "cpu": _CPU_DTYPES, "triton": _TRITON_DTYPES,
                                "cuda": _CUDA_DTYPES},
                      validate=_validate, examples=validation.row_examples)


def ln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Reference: ``F.layer_norm(x, (D,), eps=eps) * (1 + scale[:, None]) + shift[:, None]``."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---- input validation -----------------------------------------------------------------------

def _check_inputs(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> None:
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ln_modulate: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"ln_modulate: x must be 3-D (N, T, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"ln_modulate: x must be a floating-point tensor, got {x.dtype}")
    N, _, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if t.dim() != 2 or t.shape[0] != N or t.shape[1] != D:
            raise ValueError(f"ln_modulate: {name} must have shape (N, D) = ({N}, {D}) to match x "
                             f"of shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"ln_modulate: {name} must have the same dtype as x ({x.dtype}), "
                             f"got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"ln_modulate: {name} must be on the same device as x ({x.device}), "
                             f"got {t.device}")
    if not eps >= 0:
        raise ValueError(f"ln_modulate: eps must be >= 0, got {eps}")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last(t: Tensor) -> Tensor:
    """The C++ kernels read (N, D) rows with any row stride but need unit stride along D."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---- backend kernels: (x, shift, scale, eps) -> (y, mean, rstd) and
#                       (dy, x, scale, mean, rstd) -> (dx, dshift, dscale) -----------------------

def _fwd_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    acc = _stats_dtype(x.dtype)
    if x.dtype == acc:
        # fp32/fp64: native_layer_norm is what F.layer_norm runs, so y is bit-identical to the
        # official modulate(norm(x), shift, scale); it also returns the statistics backward needs.
        xhat, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        y = xhat * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return y, mean.squeeze(-1), rstd.squeeze(-1)
    # bf16/fp16: fp32 math, one rounding at the end.
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    y = xc * rstd * (1 + scale.to(acc).unsqueeze(1)) + shift.to(acc).unsqueeze(1)
    return y.to(x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def _bwd_reference(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor):
    acc = mean.dtype
    dyf = dy.to(acc)
    xhat = (x.to(acc) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dyf * (1 + scale.to(acc).unsqueeze(1))
    dx = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True)
                               - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dyf.sum(1).to(x.dtype), (dyf * xhat).sum(1).to(x.dtype)


def _fwd_native(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    return torch.ops.dit_fast.ln_modulate_fwd(x.contiguous(), _unit_last(shift), _unit_last(scale),
                                              eps)


def _bwd_native(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor):
    return torch.ops.dit_fast.ln_modulate_bwd(dy.contiguous(), x.contiguous(), _unit_last(scale),
                                              mean.contiguous(), rstd.contiguous())


def _fwd_triton(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    from ..kernels.triton import ln_modulate as k
    return k.ln_modulate_fwd(x, shift, scale, eps)


def _bwd_triton(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor):
    from ..kernels.triton import ln_modulate as k
    return k.ln_modulate_bwd(dy, x, scale, mean, rstd)


_FWD: dict[str, Callable] = {"reference": _fwd_reference, "cpu": _fwd_native,
                             "triton": _fwd_triton, "cuda": _fwd_native}
_BWD: dict[str, Callable] = {"reference": _bwd_reference, "cpu": _bwd_native,
                             "triton": _bwd_triton, "cuda": _bwd_native}


def _forward(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    return _FWD[_backends.select(OP_NAME, x)](x, shift, scale, eps)


# ---- custom ops -----------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::ln_modulate", mutates_args=())
def _ln_modulate_op(x: Tensor, shift: Tensor, scale: Tensor,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, shift, scale, eps)


@_ln_modulate_op.register_fake
def _(x, shift, scale, eps):
    N, T, D = x.shape
    st = _stats_dtype(x.dtype)
    return x.new_empty((N, T, D)), x.new_empty((N, T), dtype=st), x.new_empty((N, T), dtype=st)


@torch.library.custom_op("dit_fast::ln_modulate_backward", mutates_args=())
def _ln_modulate_backward_op(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor,
                             rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _BWD[_backends.select(OP_NAME, x)](dy, x, scale, mean, rstd)


@_ln_modulate_backward_op.register_fake
def _(dy, x, scale, mean, rstd):
    N, T, D = x.shape
    return x.new_empty((N, T, D)), x.new_empty((N, D)), x.new_empty((N, D))


def _setup_context(ctx, inputs, output):
    x, _shift, scale, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _ln_modulate_backward_op(dy, x, scale, mean, rstd)
    return dx, dshift, dscale, None


_ln_modulate_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """Fake (meta) kernels for the C++ ops, so they can be traced / opcheck'ed directly too."""
    if _backends._probe("cpu") is not None:  # dit_fast._C not built: the ops do not exist
        return

    @torch.library.register_fake("dit_fast::ln_modulate_fwd")
    def _(x, shift, scale, eps):
        N, T, D = x.shape
        st = _stats_dtype(x.dtype)
        return x.new_empty((N, T, D)), x.new_empty((N, T), dtype=st), x.new_empty((N, T), dtype=st)

    @torch.library.register_fake("dit_fast::ln_modulate_bwd")
    def _(dy, x, scale, mean, rstd):
        N, T, D = x.shape
        return x.new_empty((N, T, D)), x.new_empty((N, D)), x.new_empty((N, D))


_register_native_fakes()


# ---- public API -----------------------------------------------------------------------------

@nvtx.annotate("dit_fast.ln_modulate")
def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """``LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]`` (no affine, biased variance).

    x: (N, T, D); shift, scale: (N, D), same dtype and device as x (any row stride: chunks of
    DiT's adaLN output are read in place). Differentiable w.r.t. x, shift and scale (first order);
    works under torch.compile(fullgraph=True). The backend follows DIT_FAST_BACKEND / use_backend
    (dit_fast._backends). Raises ValueError for malformed inputs.
    """
    _check_inputs(x, shift, scale, eps)
    eps = float(eps)
    if eager_inference(x, shift, scale):
        return _forward(x, shift, scale, eps)[0]  # eager inference: skip the op/autograd layers
    return _ln_modulate_op(x, shift, scale, eps)[0]
