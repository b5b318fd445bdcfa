"""DiT's gated residual update, alone and fused with the next LayerNorm-modulate.

    gated_residual_ln_modulate(x, y, gate, shift, scale, eps) -> (x_new, h):
        x_new = x + gate[:, None, :] * y
        h     = LayerNorm(x_new) * (1 + scale[:, None, :]) + shift[:, None, :]   (no affine)
    gated_residual(x, y, gate) -> x + gate[:, None, :] * y

x, y: (N, T, D); gate, shift, scale: (N, D) (any row stride: chunks of DiT's adaLN output are
read in place). In a DiT block the attention branch's residual update and the MLP's input norm
become one pass over memory (read x, y; write x_new, h):

    x, h = gated_residual_ln_modulate(x, attn_out, gate_msa, shift_mlp, scale_mlp)
    x = gated_residual(x, mlp(h), gate_mlp)

For reduced-precision storage the LayerNorm is taken of x_new *as stored* (rounded), exactly what
the unfused ``x = x + gate * y; h = ln_modulate(x, ...)`` computes.

Public API: `gated_residual_ln_modulate`, `gated_residual` (dispatch to a backend, see
dit_fast._backends) and the references `gated_residual_ln_modulate_ref`, `gated_residual_ref`.
Structure as dit_fast.ops.ln_modulate: `torch.library.custom_op`s ``dit_fast::gated_residual_ln_modulate``
(-> x_new, h, mean, rstd) / ``dit_fast::gated_residual`` with fake impls and registered autograd
(backward ops ``..._backward``), each picking its backend at run time; eager inference skips the
op/autograd layers. Backends: reference (PyTorch), cpu / cuda (C++ ops
``torch.ops.dit_fast.gated_residual[_ln_modulate]_fwd/bwd``), triton
(dit_fast/kernels/triton/gated_residual.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backends, nvtx, validation
from ._eager import eager_inference
from .ln_modulate import DEFAULT_EPS

__all__ = ["gated_residual_ln_modulate", "gated_residual_ln_modulate_ref", "gated_residual",
           "gated_residual_ref", "OP_NAME", "OP_NAME_PLAIN"]

OP_NAME = "gated_residual_ln_modulate"
OP_NAME_PLAIN = "gated_residual"

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: forward (x_new, h, mean, rstd) and backward. As in
    the op (and tests/test_gated_residual.py), h is the LayerNorm of x_new *as stored*."""
    (x, y, dxn, dh), (gate, shift, scale) = validation.row_inputs(like, 4, 3, exact)
    fwd = lambda b, *a: _FWD[b](*a, DEFAULT_EPS)  # noqa: E731
    inputs = (x, y, gate, shift, scale)
    x64, y64, g64, sh64, sc64 = (t.double() for t in inputs)

    def stored(xn):  # reference forward of the stored x_new: (x_new, h, mean, rstd) in float64
        z = torch.zeros_like(g64)
        return _fwd_reference(xn.double(), torch.zeros_like(xn, dtype=torch.float64), z, sh64, sc64,
                              DEFAULT_EPS)

    def bwd(b, *a):
        xn, _h, mean, rstd = fwd(b, *a)
        return (xn,) + tuple(_BWD[b](dxn, dh, xn, a[1], a[2], a[4], mean, rstd))

    def bwd_truth(got):
        _, _, mean, rstd = stored(got[0])
        return (None,) + tuple(_bwd_reference(dxn.double(), dh.double(), got[0].double(), y64, g64,
                                              sc64, mean, rstd))

    return validation.run_phases(OP_NAME, backend, [
        validation.phase("fwd", fwd, inputs, ("x_new", "h", "mean", "rstd"),
                         truth=lambda got: (x64 + g64.unsqueeze(1) * y64,) + stored(got[0])[1:]),
        validation.phase("bwd", bwd, inputs, (None, "dx", "dy", "dgate", "dshift", "dscale"),
                         kind="grad", truth=bwd_truth),
    ], grad)


def _validate_plain(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: gated_residual forward and backward."""
    (x, y, dout), (gate,) = validation.row_inputs(like, 3, 1, exact)
    return validation.run_phases(OP_NAME_PLAIN, backend, [
        validation.phase("fwd", lambda b, *a: _PLAIN_FWD[b](*a), (x, y, gate), ("out",)),
        validation.phase("bwd", lambda b, *a: _PLAIN_BWD[b](*a), (dout, y, gate), ("dy", "dgate"),
                         kind="grad"),
    ], grad)


for _name, _check in ((OP_NAME, _validate), (OP_NAME_PLAIN, _validate_plain)):
    _backends.register_op(_name, {"reference": None, "cpu": _CPU_DTYPES,
                                  "triton": _TRITON_DTYPES, "cuda": _CUDA_DTYPES},
                          validate=_check, examples=validation.row_examples)


def gated_residual_ref(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """Reference: ``x + gate[:, None] * y``."""
    return x + gate.unsqueeze(1) * y


def gated_residual_ln_modulate_ref(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                   eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """Reference: ``x_new = x + gate[:, None] * y`` and
    ``F.layer_norm(x_new, (D,), eps=eps) * (1 + scale[:, None]) + shift[:, None]``."""
    x_new = x + gate.unsqueeze(1) * y
    h = F.layer_norm(x_new, (x_new.shape[-1],), eps=eps) * (1 + scale.unsqueeze(1)) \
        + shift.unsqueeze(1)
    return x_new, h


# ---- input validation -----------------------------------------------------------------------

def _check_inputs(op: str, x: Tensor, y: Tensor, params: tuple[tuple[str, Tensor], ...]) -> None:
    for name, t in (("x", x), ("y", y)) + params:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be 3-D (N, T, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    N, _, D = x.shape
    for name, t in params:
        if t.dim() != 2 or t.shape[0] != N or t.shape[1] != D:
            raise ValueError(f"{op}: {name} must have shape (N, D) = ({N}, {D}) to match x of "
                             f"shape {tuple(x.shape)}, got {tuple(t.shape)}")
    for name, t in (("y", y),) + params:
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have the same dtype as x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on the same device as x ({x.device}), "
                             f"got {t.device}")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---- backend kernels --------------------------------------------------------------------------
# fused: (x, y, gate, shift, scale, eps) -> (x_new, h, mean, rstd)
#        (dx_new | None, dh, x_new, y, gate, scale, mean, rstd) -> (dx, dy, dgate, dshift, dscale)
# plain: (x, y, gate) -> out;  (dout, y, gate) -> (dy, dgate)

def _fwd_reference(x, y, gate, shift, scale, eps):
    acc = _stats_dtype(x.dtype)
    if x.dtype == acc:
        # fp32/fp64: the official expressions (``x + gate * y``, F.layer_norm's kernel, modulate),
        # so the reference backend is bit-identical to the unfused model; native_layer_norm also
        # returns the statistics the backward needs.
        x_new = x + gate.unsqueeze(1) * y
        xhat, mean, rstd = torch.native_layer_norm(x_new, (x.shape[-1],), None, None, eps)
        h = xhat * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return x_new, h, mean.squeeze(-1), rstd.squeeze(-1)
    # bf16/fp16: fp32 math, one rounding of x_new and of h.
    x_new = (x.to(acc) + gate.to(acc).unsqueeze(1) * y.to(acc)).to(x.dtype)
    r = x_new.to(acc)  # the LayerNorm sees x_new as stored
    mean = r.mean(-1, keepdim=True)
    rc = r - mean
    rstd = torch.rsqrt(rc.square().mean(-1, keepdim=True) + eps)
    h = rc * rstd * (1 + scale.to(acc).unsqueeze(1)) + shift.to(acc).unsqueeze(1)
    return x_new, h.to(x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def _bwd_reference(dx_new, dh, x_new, y, gate, scale, mean, rstd):
    acc = mean.dtype
    dhf = dh.to(acc)
    xhat = (x_new.to(acc) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dhf * (1 + scale.to(acc).unsqueeze(1))
    dr = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True)
                               - xhat * (g * xhat).mean(-1, keepdim=True))
    if dx_new is not None:
        dr = dr + dx_new.to(acc)
    dt = x_new.dtype
    return (dr.to(dt), (gate.to(acc).unsqueeze(1) * dr).to(dt), (dr * y.to(acc)).sum(1).to(dt),
            dhf.sum(1).to(dt), (dhf * xhat).sum(1).to(dt))


def _plain_fwd_reference(x, y, gate):
    acc = _stats_dtype(x.dtype)
    return (x.to(acc) + gate.to(acc).unsqueeze(1) * y.to(acc)).to(x.dtype)


def _plain_bwd_reference(dout, y, gate):
    acc = _stats_dtype(dout.dtype)
    d = dout.to(acc)
    return ((gate.to(acc).unsqueeze(1) * d).to(dout.dtype),
            (d * y.to(acc)).sum(1).to(dout.dtype))


def _fwd_native(x, y, gate, shift, scale, eps):
    return torch.ops.dit_fast.gated_residual_ln_modulate_fwd(
        x.contiguous(), y.contiguous(), _unit_last(gate), _unit_last(shift), _unit_last(scale), eps)


def _bwd_native(dx_new, dh, x_new, y, gate, scale, mean, rstd):
    return torch.ops.dit_fast.gated_residual_ln_modulate_bwd(
        None if dx_new is None else dx_new.contiguous(), dh.contiguous(), x_new.contiguous(),
        y.contiguous(), _unit_last(gate), _unit_last(scale), mean.contiguous(), rstd.contiguous())


def _plain_fwd_native(x, y, gate):
    return torch.ops.dit_fast.gated_residual_fwd(x.contiguous(), y.contiguous(), _unit_last(gate))


def _plain_bwd_native(dout, y, gate):
    return torch.ops.dit_fast.gated_residual_bwd(dout.contiguous(), y.contiguous(), _unit_last(gate))


def _triton():
    from ..kernels.triton import gated_residual as k
    return k


_FWD: dict[str, Callable] = {
    "reference": _fwd_reference, "cpu": _fwd_native, "cuda": _fwd_native,
    "triton": lambda *a: _triton().gated_residual_ln_modulate_fwd(*a)}
_BWD: dict[str, Callable] = {
    "reference": _bwd_reference, "cpu": _bwd_native, "cuda": _bwd_native,
    "triton": lambda *a: _triton().gated_residual_ln_modulate_bwd(*a)}
_PLAIN_FWD: dict[str, Callable] = {
    "reference": _plain_fwd_reference, "cpu": _plain_fwd_native, "cuda": _plain_fwd_native,
    "triton": lambda *a: _triton().gated_residual_fwd(*a)}
_PLAIN_BWD: dict[str, Callable] = {
    "reference": _plain_bwd_reference, "cpu": _plain_bwd_native, "cuda": _plain_bwd_native,
    "triton": lambda *a: _triton().gated_residual_bwd(*a)}


def _forward(x, y, gate, shift, scale, eps):
    return _FWD[_backends.select(OP_NAME, x)](x, y, gate, shift, scale, eps)


def _plain_forward(x, y, gate):
    return _PLAIN_FWD[_backends.select(OP_NAME_PLAIN, x)](x, y, gate)


# ---- custom ops: fused ------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::gated_residual_ln_modulate", mutates_args=())
def _fused_op(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
              eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(x, y, gate, shift, scale, eps)


@_fused_op.register_fake
def _(x, y, gate, shift, scale, eps):
    N, T, D = x.shape
    st = _stats_dtype(x.dtype)
    return (x.new_empty((N, T, D)), x.new_empty((N, T, D)), x.new_empty((N, T), dtype=st),
            x.new_empty((N, T), dtype=st))


@torch.library.custom_op("dit_fast::gated_residual_ln_modulate_backward", mutates_args=())
def _fused_backward_op(dx_new: Optional[Tensor], dh: Tensor, x_new: Tensor, y: Tensor, gate: Tensor,
                       scale: Tensor, mean: Tensor,
                       rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _BWD[_backends.select(OP_NAME, x_new)](dx_new, dh, x_new, y, gate, scale, mean, rstd)


@_fused_backward_op.register_fake
def _(dx_new, dh, x_new, y, gate, scale, mean, rstd):
    N, T, D = x_new.shape
    return (x_new.new_empty((N, T, D)), x_new.new_empty((N, T, D)), x_new.new_empty((N, D)),
            x_new.new_empty((N, D)), x_new.new_empty((N, D)))


def _fused_setup_context(ctx, inputs, output):
    _x, y, gate, _shift, scale, _eps = inputs
    x_new, _h, mean, rstd = output
    ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _fused_backward(ctx, dx_new, dh, _dmean, _drstd):
    x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(x_new)
    dx, dy, dgate, dshift, dscale = _fused_backward_op(dx_new, dh, x_new, y, gate, scale, mean,
                                                       rstd)
    return dx, dy, dgate, dshift, dscale, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---- custom ops: plain ------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::gated_residual", mutates_args=())
def _plain_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return _plain_forward(x, y, gate)


@_plain_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


@torch.library.custom_op("dit_fast::gated_residual_backward", mutates_args=())
def _plain_backward_op(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return _PLAIN_BWD[_backends.select(OP_NAME_PLAIN, dout)](dout, y, gate)


@_plain_backward_op.register_fake
def _(dout, y, gate):
    N, T, D = dout.shape
    return dout.new_empty((N, T, D)), dout.new_empty((N, D))


def _plain_setup_context(ctx, inputs, output):
    _x, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _plain_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _plain_backward_op(dout, y, gate)
    return dout, dy, dgate


_plain_op.register_autograd(_plain_backward, setup_context=_plain_setup_context)


def _register_native_fakes() -> None:
    """Fake (meta) kernels for the C++ ops, so they can be traced / opcheck'ed directly too."""
    if _backends._probe("cpu") is not None:  # dit_fast._C not built: the ops do not exist
        return

    @torch.library.register_fake("dit_fast::gated_residual_ln_modulate_fwd")
    def _(x, y, gate, shift, scale, eps):
        st = _stats_dtype(x.dtype)
        return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=st),
                x.new_empty(x.shape[:2], dtype=st))

    @torch.library.register_fake("dit_fast::gated_residual_ln_modulate_bwd")
    def _(dx_new, dh, x_new, y, gate, scale, mean, rstd):
        N, T, D = x_new.shape
        return (x_new.new_empty((N, T, D)), x_new.new_empty((N, T, D)), x_new.new_empty((N, D)),
                x_new.new_empty((N, D)), x_new.new_empty((N, D)))

    @torch.library.register_fake("dit_fast::gated_residual_fwd")
    def _(x, y, gate):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dit_fast::gated_residual_bwd")
    def _(dout, y, gate):
        N, T, D = dout.shape
        return dout.new_empty((N, T, D)), dout.new_empty((N, D))


_register_native_fakes()


# ---- public API -------------------------------------------------------------------------------

@nvtx.annotate("dit_fast.gated_residual_ln_modulate")
def gated_residual_ln_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                               eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """Returns ``(x_new, h)``: ``x_new = x + gate[:, None] * y`` (the updated residual stream) and
    ``h = LayerNorm(x_new) * (1 + scale[:, None]) + shift[:, None]`` (no affine, biased variance).

    x, y: (N, T, D), same dtype/device; gate, shift, scale: (N, D), same dtype/device (any row
    stride). Both outputs have x's shape and dtype. Differentiable w.r.t. all five tensors (first
    order), also when only one of the outputs is used; works under torch.compile(fullgraph=True).
    Raises ValueError for malformed inputs.
    """
    _check_inputs("gated_residual_ln_modulate", x, y,
                  (("gate", gate), ("shift", shift), ("scale", scale)))
    if not eps >= 0:
        raise ValueError(f"gated_residual_ln_modulate: eps must be >= 0, got {eps}")
    eps = float(eps)
    if eager_inference(x, y, gate, shift, scale):
        x_new, h = _forward(x, y, gate, shift, scale, eps)[:2]  # eager inference fast path
        return x_new, h
    x_new, h, _mean, _rstd = _fused_op(x, y, gate, shift, scale, eps)
    return x_new, h


@nvtx.annotate("dit_fast.gated_residual")
def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + gate[:, None] * y`` for x, y (N, T, D) and gate (N, D) (any row stride), same
    dtype/device. Differentiable (first order); torch.compile(fullgraph=True)-friendly. Raises
    ValueError for malformed inputs."""
    _check_inputs("gated_residual", x, y, (("gate", gate),))
    if eager_inference(x, y, gate):
        return _plain_forward(x, y, gate)
    return _plain_op(x, y, gate)
